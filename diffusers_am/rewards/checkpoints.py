"""Checkpoint plumbing shared by the reward loaders: local path or Hub id, strict loading.

Nothing here downloads unless ``path`` is not a local file or folder; then huggingface_hub
fetches the documented file (honouring HF_HUB_OFFLINE, which turns a miss into a ValueError).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from ..errors import UserError


def resolve_file(path: str | os.PathLike | None, *, default_repo: str, filename: str, argument: str = "path") -> Path:
    """A local checkpoint file for ``path``: a file, a folder holding ``filename``, or a Hub repo id
    (``default_repo`` when None) from which ``filename`` is downloaded."""
    source = default_repo if path is None else str(path)
    local = Path(source).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        candidate = local / filename
        if not candidate.is_file():
            raise UserError(f"`{argument}` {source!r} is a folder without {filename!r}: put the checkpoint file there or pass the file itself.")
        return candidate
    if not looks_like_repo_id(source):
        raise UserError(f"`{argument}` {source!r} does not exist: pass an existing local file or folder, or a Hub repo id like {default_repo!r}.")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, filename))
    except Exception as err:  # offline, unknown repo, missing file
        raise UserError(
            f"`{argument}` {source!r}: cannot get {filename!r} from the Hub ({type(err).__name__}: {err}). "
            f"Offline, download it elsewhere (`hf download {source} {filename} --local-dir <folder>`) "
            "and pass that folder or file."
        ) from err


def looks_like_repo_id(source: str) -> bool:
    """``owner/name`` or ``name``: no leading ``/ . ~``, at most one slash, no file extension."""
    return not source.startswith(("/", ".", "~")) and source.count("/") <= 1 and not source.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".json", ".txt")
    )


def torch_load(file: str | os.PathLike) -> Any:
    """``torch.load`` on CPU with ``weights_only=True`` (no pickled code runs)."""
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {str(file)!r} as a torch state dict ({type(err).__name__}: {err}).") from err


def unwrap_state_dict(obj: Any, file: str | os.PathLike, wrappers: Sequence[str] = ("state_dict", "model")) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint ({'state_dict': ...} or bare), ``module.`` stripped."""
    for key in wrappers:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {str(file)!r} is not a state dict of tensors.")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _short(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(expected: Iterable[str], found: Iterable[str], *, source: str) -> None:
    """ValueError naming the missing and unexpected keys when the two key sets differ."""
    expected, found = set(expected), set(found)
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        raise UserError(f"checkpoint {source} does not match the model; " + "; ".join(parts) + ". Is it the right file for this reward?")


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict(strict=True)`` with a ValueError naming missing/unexpected keys and shape mismatches."""
    check_keys(module.state_dict().keys(), state_dict.keys(), source=source)
    own = module.state_dict()
    bad = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state_dict.items() if v.shape != own[k].shape]
    if bad:
        raise UserError(f"checkpoint {source} has tensors of the wrong shape: {_short(bad, 6)}.")
    module.load_state_dict(state_dict, strict=True)


def skip_init():
    """Context that skips weight initialization (every tensor is then overwritten by a strict load):
    transformers' ``no_init_weights`` when available, else a no-op."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older / newer transformers without it: initialize normally
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def check_prompts(images: torch.Tensor, prompts: Sequence[Any]) -> list:
    """As many prompts as images (a str is refused: pass a list)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise UserError(f"`prompts` must be a list with one prompt per image; got {type(prompts).__name__}.")
    if len(prompts) != images.shape[0]:
        raise UserError(f"`prompts` has {len(prompts)} entries for {images.shape[0]} images: pass one prompt per image.")
    return [str(p) for p in prompts]


def place(module: torch.nn.Module, device: torch.device | str | None, dtype: torch.dtype | None) -> torch.nn.Module:
    """Move a frozen reward model to device/dtype, in eval mode, with requires_grad off."""
    module.eval().requires_grad_(False)
    if dtype is not None:
        module.to(dtype=dtype)
    if device is not None:
        module.to(device=device)
    return module
