"""Reward models: differentiable maps (images [B, C, H, W] in [0, 1], prompts) -> rewards [B].

A reward is any callable ``reward(images, prompts) -> Tensor[B]``. ``prompts`` is a list of
strings for text-to-image models, of class labels (ints) for class-conditional ones.
Each concrete reward does its own preprocessing (resize, crop, normalize) in torch, so that
gradients reach the images.
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch
from ..errors import UserError


@runtime_checkable
class RewardModel(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        """images [B, C, H, W] float in [0, 1]; returns [B]."""


def check_images(images: torch.Tensor, channels: Sequence[int] = (1, 3), name: str = "images") -> None:
    """Raise ValueError unless ``images`` is [B, C, H, W] with C in ``channels`` and values in [0, 1]."""
    if images.dim() != 4 or images.shape[1] not in tuple(channels):
        raise UserError(
            f"`{name}` must be [B, C, H, W] with C in {tuple(channels)}; got shape {tuple(images.shape)}."
        )
    lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise UserError(f"`{name}` must be floats in [0, 1] (decode with x * 0.5 + 0.5); got range [{lo:.3f}, {hi:.3f}].")


def check_reward_output(rewards: Any, batch: int, name: str) -> torch.Tensor:
    """``rewards`` if it is a float Tensor [batch] (one value per image); ValueError naming ``name`` else."""
    if not isinstance(rewards, torch.Tensor):
        raise UserError(
            f"reward {name!r} must return a torch.Tensor of shape [{batch}] (one value per image); "
            f"it returned a {type(rewards).__name__}."
        )
    if tuple(rewards.shape) != (batch,):
        raise UserError(
            f"reward {name!r} must return one value per image, shape [{batch}]; "
            f"it returned shape {list(rewards.shape)}."
        )
    if not rewards.is_floating_point():
        raise UserError(f"reward {name!r} must return floating-point values; it returned {rewards.dtype}.")
    return rewards


def user_code_error(err: BaseException) -> str:
    """One line for an exception raised by the user's own code (a reward file or callable): the error and
    where in that code it arose (``file, line N``); for a syntax error, the file and line of it."""
    if isinstance(err, SyntaxError):
        return f"{err.filename}, line {err.lineno}: syntax error ({err.msg}); fix that line."
    message = (str(err).strip().splitlines() or [""])[0][:300]
    where = ""
    ours = (str(Path(torch.__file__).parent), str(Path(__file__).parents[1]), str(Path(contextlib.__file__).parent))
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if not frame.filename.startswith(ours):
            where = f" ({frame.filename}, line {frame.lineno})"
            break
    return f"{type(err).__name__}: {message}{where}"


def probe_reward(
    reward: Callable, images: torch.Tensor, prompts: Sequence[Any], name: str, *, user_code: bool = False
) -> None:
    """Call ``reward`` once on ``images`` [B, C, H, W] (B >= 2) and check its contract before training:
    a float Tensor [B] on the images' device, differentiable with respect to the images, leaving the images
    unchanged. ValueError naming ``name`` otherwise. ``user_code``: the reward is the user's own code, so an
    exception it raises is a one-line ValueError naming it and the line (else it propagates: our bug)."""
    x = images.detach().float().clone().requires_grad_(True)
    before = x.detach().clone()
    with torch.enable_grad():
        out = _call_user(lambda: reward(x, list(prompts)), name, x.shape[0], user_code)
        if not torch.equal(x.detach(), before):
            raise UserError(
                f"reward {name!r} changes its input images in place: compute on a copy (images * 2, not "
                "images.mul_(2) or images.data.mul_(2)); other rewards and the grids read the same images."
            )
        out = check_reward_output(out, x.shape[0], name)
        if out.device != x.device:
            raise UserError(
                f"reward {name!r} returned its values on {out.device} for images on {x.device}: return them on "
                "the images' device (e.g. `.to(images.device)`)."
            )
        grad = None
        if out.requires_grad:
            (grad,) = _call_user(
                lambda: torch.autograd.grad(out.float().sum(), x, allow_unused=True), name, x.shape[0], user_code
            )
    if grad is None:
        raise UserError(
            f"reward {name!r} is not differentiable in the images (its output is detached from them, e.g. computed "
            "under no_grad, with numpy or .item()); the trained methods need grad r(x): compute it with torch ops."
        )


def _call_user(call: Callable, name: str, batch: int, user_code: bool) -> Any:
    """``call()``; an exception from the user's reward code becomes a one-line ValueError naming it."""
    try:
        return call()
    except Exception as err:
        if not user_code:
            raise
        hint = ""
        if "in-place" in str(err) or "inplace" in str(err):
            hint = " It changes its input images in place: compute on a copy (images * 2, not images.mul_(2))."
        raise UserError(
            f"reward {name!r} failed on {batch} images [B, C, H, W] in [0, 1] before training: "
            f"{user_code_error(err)}.{hint}"
        ) from err


class WeightedReward(torch.nn.Module):
    """sum_i w_i * r_i(images, prompts)."""

    def __init__(self, rewards: dict[str, Callable], weights: dict[str, float]):
        super().__init__()
        self.names = list(rewards)
        self.weights = dict(weights)
        self.parts = torch.nn.ModuleDict({n: r for n, r in rewards.items() if isinstance(r, torch.nn.Module)})
        self._callables = {n: r for n, r in rewards.items() if not isinstance(r, torch.nn.Module)}
        self._recorded: list[dict[str, torch.Tensor]] | None = None

    def component(self, name: str) -> Callable:
        return self.parts[name] if name in self.parts else self._callables[name]

    def components(self, images: torch.Tensor, prompts: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Each unweighted component r_i [B] (fp32), by name."""
        return {name: self.component(name)(images, prompts).float() for name in self.names}

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_i w_i * r_i [B] of :meth:`components`' output."""
        total = None
        for name in self.names:
            r = self.weights[name] * components[name]
            total = r if total is None else total + r
        return total

    def forward(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        components = self.components(images, prompts)
        if self._recorded is not None:
            self._recorded.append({k: v.detach().float().cpu() for k, v in components.items()})
        return self.combine(components)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """For the duration, each call appends its unweighted components ``{name: r_i [B]}`` (detached, fp32,
        CPU) to the yielded list (the trainer logs their means as ``reward/<name>``)."""
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None
