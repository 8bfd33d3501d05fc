"""Per-update records: ``train_log.jsonl`` (one JSON object per update) and peak-memory readings."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ..jsonio import dumps

LOG_NAME = "train_log.jsonl"
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
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records of updates after ``step`` (a resumed run rewrites them)."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(self.path)
