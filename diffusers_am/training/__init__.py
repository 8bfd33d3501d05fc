"""Training: the config dataclass, prompts, the update loop, checkpoints, logs, card and Hub upload."""

from .config import TrainingConfig, build_parser, parse_args
from .trainer import AdjointMatchingTrainer, TrainResult

__all__ = ["AdjointMatchingTrainer", "TrainResult", "TrainingConfig", "build_parser", "parse_args"]
