"""Strict JSON for every file the project writes: NaN and inf become ``null``, never a bare ``NaN``.

``json.dumps`` writes ``NaN`` / ``Infinity`` by default, which no strict JSON reader accepts; ``dumps``
here converts values to plain JSON types first (tensors and numpy scalars included) and then refuses
anything left that is not strict JSON (``allow_nan=False``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def to_plain(value: Any) -> Any:
    """``value`` as plain JSON types: tensors / numpy values to lists and numbers, non-finite floats to
    None, tuples to lists, paths to strings; other unknown objects to ``str``."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    tolist = getattr(value, "tolist", None)  # torch.Tensor, numpy arrays and scalars
    if callable(tolist):
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return to_plain(value.tolist())
    return str(value)


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (see :func:`to_plain`); keyword arguments go to ``json.dumps``."""
    return json.dumps(to_plain(value), allow_nan=False, **kwargs)


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON (with a final newline) to ``path``; returns the path."""
    path = Path(path)
    path.write_text(dumps(value, indent=indent) + "\n", encoding="utf-8")
    return path
