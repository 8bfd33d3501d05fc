"""``TrainResult``: what ``AdjointMatchingTrainer.train()`` returns (built once at the end, never changed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run put things, and its headline numbers.

    ``reward_before`` / ``reward_after`` are the mean training reward of the base and the fine-tuned model on
    the fixed eval set (None with ``num_eval_samples=0``, on other processes than the main one, or when every
    reward was NaN); ``seconds_per_update`` the mean wall time of the updates run here."""

    output_dir: Path
    adapter_path: Path
    grid_path: Path
    card_path: Path
    log_path: Path
    reward_before: float | None
    reward_after: float | None
    steps: int
    skipped_updates: int
    seconds_per_update: float | None
