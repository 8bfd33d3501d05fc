"""Agreement between processes: every rank takes the same decision (no-ops on one process)."""

from __future__ import annotations

import torch


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one (one small all-reduce)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    total = accelerator.reduce(torch.tensor([float(bool(flag))], device=accelerator.device), "sum")
    return bool(total.item() > 0)


def max_over_processes(accelerator, value: int) -> int:
    """The largest ``value`` over the processes, on every process."""
    if accelerator.num_processes == 1:
        return int(value)
    values = accelerator.gather(torch.tensor([int(value)], device=accelerator.device))
    return int(values.max().item())
