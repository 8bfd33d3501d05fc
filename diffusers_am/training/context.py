"""``RunContext``: what a run builds once in set-up and the update, validation and output code read."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..models.base import FlowModelAdapter
from .config import TrainingConfig
from .methods import Method


@dataclass
class RunContext:
    """The prepared model, optimizer and fixed inputs of one run (built by ``AdjointMatchingTrainer``).

    ``adapter`` is the model adapter (the per-family wrapper; "adapter" alone means the LoRA elsewhere);
    ``train_module`` is its transformer as ``accelerator.prepare`` wrapped it (e.g. DDP);
    ``params`` are the trainable LoRA parameters and ``named_params`` the same by name;
    ``method`` is the configured method (looked up once) and ``method_options`` its step's keyword arguments
    fixed for the run (built once); ``times`` [N+1] is the sampling grid; ``eval_set`` holds the fixed
    (conditions, noise) of the before / after reward, ``validation`` the held-out validation metrics (a
    :class:`~.validation.ValidationMetrics`). K and lambda as the run uses them belong to
    :class:`~.probes.ControlProbes`."""

    config: TrainingConfig
    accelerator: Any  # accelerate.Accelerator
    adapter: FlowModelAdapter
    train_module: torch.nn.Module
    reward: Callable
    method: Method
    method_options: dict[str, Any]
    params: list[torch.nn.Parameter]
    named_params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Any | None  # diffusers.training_utils.EMAModel when --use_ema
    times: torch.Tensor
    resolution: int
    n_steps: int
    output_dir: Path
    prompts: list
    val_prompts: list
    eval_set: tuple[list, torch.Tensor]
    validation: Any  # validation.ValidationMetrics (validation.py reads a RunContext, so no import here)
    lr_history: list[tuple[int, float]] = field(default_factory=list)
    """(first update, learning rate) pairs: one, or more when a resume changed ``--learning_rate``."""

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
