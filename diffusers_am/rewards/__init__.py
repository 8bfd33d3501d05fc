"""Reward registry: by name, weighted combinations, and user callables.

``load_reward(spec)`` accepts
  * a registered name: ``"digits"``, ``"hpsv2"``, ...  (``available_rewards()`` lists them);
  * a weighted list: ``"hpsv2:1.0,pickscore:0.5"``;
  * a user callable: ``"my_module:my_reward"`` or ``"path/to/file.py:my_reward"``, a differentiable
    ``f(images, prompts) -> Tensor[B]`` with images float in [0, 1] shaped [B, C, H, W].
Each registered factory takes ``(path=None, device=None, dtype=None)``; ``path`` is a local file or
folder or a Hub id for the checkpoint (default: the documented source).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from .base import RewardModel, WeightedReward, check_images, check_reward_output, probe_reward, user_code_error

# name -> "module:factory", imported lazily
REWARDS: dict[str, str] = {
    "digits": "diffusers_am.rewards.digits:load_digits_reward",
    "digits-heldout": "diffusers_am.rewards.digits:load_digits_heldout_reward",
    "digits-heldout-accuracy": "diffusers_am.rewards.digits:load_digits_heldout_accuracy",  # evaluation only
    "hpsv2": "diffusers_am.rewards.hpsv2:load_hpsv2",
    "hpsv2.1": "diffusers_am.rewards.hpsv2:load_hpsv21",
    "pickscore": "diffusers_am.rewards.pickscore:load_pickscore",
    "clipscore": "diffusers_am.rewards.clipscore:load_clipscore",
    "aesthetic": "diffusers_am.rewards.aesthetic:load_aesthetic",
    "imagereward": "diffusers_am.rewards.imagereward:load_imagereward",
    "shapes": "diffusers_am.rewards.shapes:load_shapes_reward",
    "shapes-heldout": "diffusers_am.rewards.shapes:load_shapes_heldout_reward",
    "shapes-gold": "diffusers_am.rewards.shapes:load_shapes_gold_reward",
}

EVALUATION_REWARDS: dict[str, tuple[str, ...]] = {
    "digits": ("digits", "digits-heldout"),  # the embedded digits base: its training reward and held-out judge
    "text": ("hpsv2", "pickscore", "imagereward", "clipscore", "aesthetic"),  # text pipelines: the paper's five
}
"""The rewards ``diffusers_am.evaluate`` scores by default, per kind of base model, in report order."""


def evaluation_rewards(kind: str) -> list[str]:
    """The registered rewards scored by default when evaluating a ``kind`` base (a key of
    :data:`EVALUATION_REWARDS`: ``"digits"`` or ``"text"``); empty for any other kind."""
    return list(EVALUATION_REWARDS.get(kind, ()))


def register_reward(name: str, target: str | Callable) -> None:
    """Register a factory (or its ``"module:factory"`` path) under ``name``."""
    REWARDS[name] = target


def available_rewards() -> list[str]:
    return sorted(REWARDS)


def _factory(name: str) -> Callable:
    target = REWARDS[name]
    if callable(target):
        return target
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)


def _user_callable(spec: str) -> Callable:
    module_part, attr = spec.rsplit(":", 1)
    if module_part.endswith(".py") or os.sep in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise UserError(f"`--reward` {spec!r}: file {str(path)!r} does not exist.")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as err:  # the user's file: a syntax error, or an error running it
            raise UserError(f"`--reward` {spec!r}: {user_code_error(err)}") from err
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as err:
            raise UserError(f"`--reward` {spec!r}: cannot import module {module_part!r} ({err}).") from err
        except Exception as err:  # the user's module: a syntax error, or an error running it
            raise UserError(f"`--reward` {spec!r}: importing {module_part!r} failed: {user_code_error(err)}") from err
    if not hasattr(module, attr) or not callable(getattr(module, attr)):
        raise UserError(f"`--reward` {spec!r}: module {module_part!r} has no callable {attr!r}.")
    return getattr(module, attr)


def is_user_reward(spec: str) -> bool:
    """Whether ``spec`` names the user's own code (``module:callable`` or ``file.py:callable``), not a
    registered reward or a weighted list of them: an error raised by it is the user's to fix."""
    spec = spec.strip()
    try:
        return spec not in REWARDS and _parse_weighted(spec) is None
    except ValueError:  # a malformed weighted list of registered rewards
        return False


def _parse_weighted(spec: str) -> dict[str, float] | None:
    """``"a:1.0,b:0.5"`` -> {"a": 1.0, "b": 0.5}; None when ``spec`` is not of that form (names not registered).

    A weight is a finite non-zero number (negative: that reward is pushed down); ValueError naming
    ``--reward`` for a NaN, infinite or zero weight and for a name given twice."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    out: dict[str, float] = {}
    for part in parts:
        name, sep, weight = part.rpartition(":")
        if not sep or name not in REWARDS:
            return None
        try:
            value = float(weight)
        except ValueError:
            return None
        if name in out:
            raise UserError(
                f"`--reward` {spec!r} names {name!r} twice; give each reward once with its total weight "
                f"(e.g. {name}:{out[name] + value:g})."
            )
        if not math.isfinite(value) or value == 0.0:
            raise UserError(
                f"`--reward` {spec!r}: the weight of {name!r} is {weight.strip()!r}; a weight must be a finite "
                "non-zero number (negative pushes that reward down), e.g. hpsv2:1.0,pickscore:0.5."
            )
        out[name] = value
    return out or None


def check_reward_spec(spec: str) -> None:
    """ValueError (the one line :func:`load_reward` would give) unless ``spec`` has one of the accepted forms:
    a registered name, a weighted list of them with finite non-zero weights, each name once, or
    ``module:callable`` / ``file.py:callable``. Nothing is imported or loaded."""
    spec = spec.strip()
    if spec in REWARDS or _parse_weighted(spec) is not None or (":" in spec and "," not in spec):
        return
    raise UserError(_unknown(spec))


def _unknown(spec: str) -> str:
    return (
        f"unknown reward {spec!r}; known rewards: {', '.join(available_rewards())}. "
        "Also accepted: a weighted list 'a:1.0,b:0.5' or 'module:callable' for your own reward."
    )


def load_reward(
    spec: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None, paths: dict[str, str] | None = None
) -> Callable:
    """Build the reward named by ``spec`` (see the module docstring).

    ``paths`` maps a registered name to a local checkpoint path or Hub id.
    Raises ValueError for an unknown name, listing the known ones."""
    spec = spec.strip()
    paths = paths or {}
    if spec in REWARDS:
        return _factory(spec)(path=paths.get(spec), device=device, dtype=dtype)
    weighted = _parse_weighted(spec)
    if weighted is not None:
        parts = {n: _factory(n)(path=paths.get(n), device=device, dtype=dtype) for n in weighted}
        return WeightedReward(parts, weighted)
    if ":" in spec and "," not in spec:
        return _user_callable(spec)
    raise UserError(_unknown(spec))


__all__ = [
    "EVALUATION_REWARDS", "REWARDS", "RewardModel", "WeightedReward", "available_rewards", "check_images", "check_reward_output",
    "check_reward_spec", "evaluation_rewards", "is_user_reward", "load_reward", "probe_reward", "register_reward", "user_code_error",
]
