"""Training: the config dataclass, prompts, the trainer's set-up and loop, one update, validation,
checkpoints, logs, the end-of-run outputs (card, Hub upload)."""

from .config import TrainingConfig, build_parser, parse_args
from .result import TrainResult
from .trainer import AdjointMatchingTrainer

__all__ = ["AdjointMatchingTrainer", "TrainResult", "TrainingConfig", "build_parser", "parse_args"]
