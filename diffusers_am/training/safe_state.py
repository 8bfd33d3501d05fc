"""Training state stored without pickle: nested state dicts as a safetensors file (the tensors) beside a
JSON file (the structure), and each process's random-number-generator states in a safetensors file.

A resumed run reads checkpoints that may have been shared or edited; pickle (``torch.load`` of a ``.bin``,
accelerate's ``.pkl`` files) can run code when read, so the trainer's checkpoints hold none and resuming
never unpickles (:func:`pickle_files` finds the files that would need it, and a checkpoint holding one is
refused). JSON holds ``None``, bools, ints, floats (non-finite ones as ``{"float": "nan"}``), strings, lists
and dicts; tuples come back as lists, dict keys keep their type (``{"dict": [[key, value], ...]}``) and a
tensor is ``{"tensor": "<key in the safetensors file>"}``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .layout import rng_file

PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
"""File endings of pickled state (accelerate's and torch.save's)."""


def pickle_files(folder: str | Path) -> list[str]:
    """Paths (relative, posix) of the files under ``folder`` that would need unpickling to read."""
    root = Path(folder)
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES
    )


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint without pickle")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"tensor"}:
            return tensors[value["tensor"]]
        if set(value) == {"dict"}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value["dict"]}
        if set(value) == {"float"} and value["float"] in ("nan", "inf", "-inf"):
            return float(value["float"])
        raise UserError(f"unknown entry {sorted(value)}")
    return value


def save_state_dict(state: dict[str, Any], folder: str | Path, name: str) -> None:
    """Write ``state`` as ``<name>.safetensors`` (its tensors) and ``<name>.json`` (the rest) in ``folder``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors)
    save_file(tensors, str(Path(folder) / f"{name}.safetensors"))
    (Path(folder) / f"{name}.json").write_text(json.dumps(structure) + "\n", encoding="utf-8")


def load_state_dict(folder: str | Path, name: str) -> dict[str, Any]:
    """Read what :func:`save_state_dict` wrote (tensors on CPU); ValueError when the files do not fit."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        tensors = load_file(str(folder / f"{name}.safetensors"))
        structure = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        state = _decode(structure, tensors)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{name}.json / {name}.safetensors cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise UserError(f"{name}.json does not hold a state dict")
    return state


def capture_rng() -> dict[str, torch.Tensor]:
    """This process's Python, NumPy, torch (CPU and CUDA) RNG states as tensors."""
    version, py_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states = {
        "python": torch.tensor([version, *py_state], dtype=torch.int64),
        "python_gauss": torch.tensor([math.nan if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_rest": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if np_kind != "MT19937":
        raise RuntimeError(f"unexpected NumPy generator {np_kind}")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda_{i}"] = state
    return states


def save_rng(states: dict[str, torch.Tensor], folder: str | Path, process_index: int) -> None:
    """Write ``states`` (from :func:`capture_rng`) as this process's RNG file in ``folder``."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in states.items()}, str(Path(folder) / rng_file(process_index)))


def restore_rng(folder: str | Path, process_index: int) -> None:
    """Set this process's RNG states from ``folder`` (the file of process 0 when this one has none: a run
    resumed on more processes than it was saved on)."""
    from safetensors.torch import load_file

    path = Path(folder) / rng_file(process_index)
    if not path.is_file():
        path = Path(folder) / rng_file(0)
    states = load_file(str(path))
    python = [int(v) for v in states["python"].tolist()]
    gauss = float(states["python_gauss"][0])
    random.setstate((python[0], tuple(python[1:]), None if math.isnan(gauss) else gauss))
    pos, has_gauss, np_gauss = states["numpy_rest"].tolist()
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), np_gauss))
    torch.set_rng_state(states["torch"])
    cuda = [states[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in states]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
