"""Deprecated names: a FutureWarning once per (old, new) pair, and the ``dtype=`` / ``torch_dtype=`` rule."""

from __future__ import annotations

import warnings
from typing import Any
from .errors import UserError

_WARNED: set[tuple[str, str]] = set()


def warn_deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """FutureWarning "`old` is deprecated; use `new`", at most once per process for this pair."""
    if (old, new) in _WARNED:
        return
    _WARNED.add((old, new))
    warnings.warn(f"`{old}` is deprecated and will be removed; use `{new}`.", FutureWarning, stacklevel=stacklevel)


def resolve_dtype(dtype: Any = None, torch_dtype: Any = None, default: Any = None) -> Any:
    """``dtype`` (the project's name), else the deprecated ``torch_dtype`` (with a FutureWarning), else
    ``default``. ValueError when both are given."""
    if dtype is not None and torch_dtype is not None:
        raise UserError("pass either `dtype` or `torch_dtype` (deprecated), not both; use `dtype`.")
    if torch_dtype is not None:
        warn_deprecated("torch_dtype", "dtype", stacklevel=4)
        return torch_dtype
    return default if dtype is None else dtype
