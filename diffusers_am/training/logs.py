"""Per-update records: ``train_log.jsonl`` (one JSON object per update) and peak-memory readings."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..jsonio import dumps

REQUIRED_FIELDS = (
    "step",
    "reward_mean",
    "reward_std",
    "loss",
    "grad_norm",
    "control_norm_per_step",
    "seconds",
    "peak_memory_bytes",
    "skipped",
    "nonfinite_count",
)


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak memory of this process so far: CUDA ``max_memory_allocated`` on a GPU, else the peak RSS."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
    except ImportError:  # Windows
        import psutil

        return int(psutil.Process().memory_info().peak_wset)


def finite_scalars(record: dict[str, Any]) -> dict[str, int | float]:
    """The finite int / float fields of a record (what a tracker logs)."""
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None and math.isfinite(v)}


class JsonlLog:
    """Appends one JSON object per line to ``path`` (flushed each time, so a crash keeps every line)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """The records, in order; ValueError (one line naming the file and line) when a line is not a JSON
        object with an integer ``step``, but for a torn last line (see :meth:`truncate_after`)."""
        return self._read()[0]

    def _read(self) -> tuple[list[dict[str, Any]], str | None]:
        """(records, the torn last line or None): a last line without its newline that does not parse was cut
        short by a crash while it was written."""
        if not self.path.is_file():
            return [], None
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{str(self.path)!r} is not UTF-8 text ({err.reason}); restore it or resume into "
                             "a new `--output_dir`.") from None
        lines = text.split("\n")
        tail = lines.pop()  # "" when the file ends with a newline
        records, torn = [], None
        for number, line in enumerate(lines + [tail], start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or isinstance(record.get("step"), bool):
                    raise UserError("not a record")
                int(record.get("step", 0))
            except (ValueError, TypeError):
                if number > len(lines):  # the last line, without its newline
                    torn = line
                    continue
                raise UserError(
                    f"{str(self.path)!r} line {number} is not a JSON record with an integer step; restore the file "
                    "or remove that line, or resume into a new `--output_dir`."
                ) from None
            records.append(record)
        return records, torn

    def truncate_after(self, step: int) -> None:
        """Drop records of updates after ``step`` (a resumed run rewrites them). A torn last line (a crash
        while writing it, after every complete one) is dropped with a warning naming the file."""
        if not self.path.is_file():
            return
        records, torn = self._read()
        if torn is not None and max((int(r.get("step", 0)) for r in records), default=0) < step:
            raise UserError(  # the torn line may be update ``step``'s own record: do not guess
                f"{str(self.path)!r} line {len(records) + 1} is cut short and the lines before it stop before "
                f"update {step}; restore the file, or resume into a new `--output_dir`."
            )
        if torn is not None:
            from .console import warn

            warn(f"dropped the torn last line of {str(self.path)!r} (cut short by a crash while it was written).")
        kept = [r for r in records if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)
