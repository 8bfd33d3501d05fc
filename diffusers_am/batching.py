"""Rows of a batch: split [B, ...] tensors (or dataclasses of them) into micro-batches and join them back.

Pure torch. A "batched" value is a tensor whose dim 0 is the batch, ``None``, or a dataclass whose fields
are such values; a tensor whose dim 0 is not the batch (or is 1 while the batch is larger) is shared by
every row (e.g. the empty prompt's embedding used for CFG) and is kept whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .errors import UserError
from .checks import positive_int


def chunk_slices(batch: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most ``size`` rows covering ``range(batch)`` (one slice when size is None)."""
    if size is None or size >= batch:
        return [slice(0, batch)]
    size = positive_int(size, "micro_batch_size")
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


def select_rows(value: Any, rows: slice, batch: int) -> Any:
    """``value`` restricted to ``rows`` of a batch of ``batch``; shared (dim-0 size 1) tensors stay whole."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != batch or (value.shape[0] == 1 and batch != 1):
            return value  # shared by every row (e.g. FLUX.1's text_ids [L, 3], an empty prompt's [1, ...])
        return value[rows]
    if dataclasses.is_dataclass(value):
        fields = {f.name: select_rows(getattr(value, f.name), rows, batch) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **fields)
    raise UserError(f"cannot split a {type(value).__name__} into rows (a tensor or a dataclass of tensors).")


def rows_of(obj: Any, rows: slice, batch: int) -> Any:
    """``obj.rows(rows)`` when ``rows`` is a strict part of the batch, else ``obj`` itself.

    Flows and reward functions that support micro-batching expose ``rows(slice)`` returning the same
    object bound to those rows of their batch; asking a part of an object without it is a ValueError."""
    if rows.start == 0 and rows.stop == batch:
        return obj
    method = getattr(obj, "rows", None)
    if method is None:
        raise UserError(
            f"{type(obj).__name__} cannot run on part of its batch (it has no `rows`); drop `micro_batch_size`."
        )
    return method(rows)
