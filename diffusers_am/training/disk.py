"""Disk checks before writing: is a folder writable, and is there room for what will be written.

Sizes are estimates: a checkpoint holds the trainable tensors twice (exact tensors and the diffusers
adapter), AdamW's two moments, the EMA copy and a few small files. The free space is read with
``shutil.disk_usage`` on the folder (or, before it exists, its nearest existing parent).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from ..errors import UserError

WRITE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG, errno.EROFS, errno.EACCES,
                errno.EPERM, errno.EIO}
"""OSError numbers that mean "the output folder cannot take this write" (not a bug in the trainer)."""

SMALL_FILES_BYTES = 256 << 10
"""Room for the small files of a save (optimizer hyper-parameters, RNG states, JSON, a grid)."""


def write_failure(err: BaseException, folder: str | Path, any_os_error: bool = False) -> str | None:
    """Why a write into ``folder`` failed, as a short phrase, when ``err`` is a failed write: an OSError of
    :data:`WRITE_ERRNOS` (any OSError with ``any_os_error``), a safetensors I/O error (``os error 28``), or
    PyTorch's zip writer giving up (``torch.save`` on a full disk raises an opaque RuntimeError from
    ``inline_container.cc``); None for any other error (a bug)."""
    if isinstance(err, OSError):
        return err.strerror or str(err) if any_os_error or err.errno in WRITE_ERRNOS else None
    text = str(err)
    match = re.search(r"os error (\d+)", text)
    if match:
        return os.strerror(int(match.group(1)))
    if "inline_container" in text or "file write failed" in text:
        return f"the file write failed with {format_bytes(free_bytes(folder))} free on its disk"
    return None


def existing_parent(path: str | Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent folder."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Free bytes on the disk holding ``path`` (or where it would be created)."""
    return int(shutil.disk_usage(existing_parent(path)).free)


def format_bytes(n: float) -> str:
    """``n`` bytes as a short human-readable size (``1.5 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_writable(folder: str | Path, what: str = "`--output_dir`") -> None:
    """ValueError unless a file can be created in ``folder`` (or, before it exists, in its nearest
    existing parent, where it would be created): read-only disks, permissions and quotas fail here."""
    target = existing_parent(folder)
    if not target.is_dir():
        raise UserError(f"{what} {str(folder)!r}: {str(target)!r} is a file, not a folder; pass a folder path.")
    try:
        fd, probe = tempfile.mkstemp(dir=target, prefix=".diffusers-am-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(
            f"{what} {str(folder)!r} is not writable ({err.strerror or err}); pass a folder you can write to."
        ) from None


def check_free_space(folder: str | Path, needed: int, what: str) -> None:
    """ValueError when the disk holding ``folder`` has fewer than ``needed`` bytes free (``what``: for what)."""
    free = free_bytes(folder)
    if free < needed:
        raise UserError(
            f"`--output_dir` {str(folder)!r} has {format_bytes(free)} free; {what} needs about "
            f"{format_bytes(needed)}: free some space or pass an `--output_dir` on another disk."
        )


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` as fp32 (how the trainable weights are saved)."""
    return sum(t.numel() * 4 for t in tensors)


def checkpoint_bytes_estimate(params: Iterable[torch.Tensor], ema: bool) -> int:
    """Bytes a checkpoint of these trainable tensors takes: exact tensors + adapter + two AdamW moments
    (+ the EMA copy) + small files."""
    size = tensor_bytes(params)
    return size * (4 + int(ema)) + SMALL_FILES_BYTES


def bytes_to_save(estimate: int) -> int:
    """Free bytes required before writing something ``estimate`` bytes large (10% and the small files spare)."""
    return int(estimate * 1.1) + SMALL_FILES_BYTES


def folder_bytes(folder: str | Path) -> int:
    """Total bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
