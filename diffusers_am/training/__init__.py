"""Training: the config dataclass, prompts, the trainer's set-up and loop, one update, validation,
checkpoints, logs, the end-of-run outputs (card, Hub upload).

The names below are imported on first use, so that ``--help`` (:mod:`.config`) imports no torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdjointMatchingTrainer": ".trainer",
    "TrainResult": ".outputs",
    "TrainingConfig": ".config",
    "build_parser": ".config",
    "parse_args": ".config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
