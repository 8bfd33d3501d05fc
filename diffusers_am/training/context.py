"""``RunContext``: what a run builds once in set-up and the update, validation and output code read."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from ..models.base import FlowModelAdapter
from .config import TrainingConfig

if TYPE_CHECKING:  # validation.py reads a RunContext: no runtime import either way
    from .validation import ValidationMetrics


@dataclass
class RunContext:
    """The prepared model, optimizer and fixed inputs of one run (built by ``AdjointMatchingTrainer``).

    ``adapter`` is the model adapter (the per-family wrapper; "adapter" alone means the LoRA elsewhere);
    ``train_module`` is its transformer as ``accelerator.prepare`` wrapped it (e.g. DDP);
    ``params`` are the trainable LoRA parameters and ``named_params`` the same by name;
    ``times`` [N+1] is the sampling grid, ``k_steps`` the truncation K of the method's next step;
    ``eval_set`` holds the fixed (conditions, noise) of the before / after reward, ``validation``
    the held-out validation metrics."""

    config: TrainingConfig
    accelerator: Any  # accelerate.Accelerator
    adapter: FlowModelAdapter
    train_module: torch.nn.Module
    reward: Callable
    params: list[torch.nn.Parameter]
    named_params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Any | None  # diffusers.training_utils.EMAModel when --use_ema
    times: torch.Tensor
    resolution: int
    n_steps: int
    k_steps: int
    output_dir: Path
    prompts: list
    val_prompts: list
    eval_set: tuple[list, torch.Tensor]
    validation: ValidationMetrics
    lr_history: list[tuple[int, float]] = field(default_factory=list)
    """(first update, learning rate) pairs: one, or more when a resume changed ``--learning_rate``."""
    reward_scale: float | None = None
    """lambda the updates use: ``--reward_scale``, or the matched lambda under ``--match_reward_scale``."""
    truncation: Any | None = None
    """The run's :class:`~diffusers_am.truncation.AdaptiveTruncation` under ``--truncate_steps auto`` (it
    sets ``k_steps`` before each update), else None."""
    reward_scale_match: dict[str, Any] | None = None
    """What ``--match_reward_scale`` measured at set-up (None when off)."""

    def __post_init__(self) -> None:
        if self.reward_scale is None:
            self.reward_scale = self.config.reward_scale

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in the LoRA parameters for the duration (nothing without ``--use_ema``)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)
