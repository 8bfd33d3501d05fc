"""Which options may change when a run resumes, and applying the ones that did.

A checkpoint records the config it was trained with. On resume, an option that defines the run (the
model, method, K, N, p, reward, LoRA, batch, seed, optimizer, schedule, precision ...) must be what it was:
changing it mid-run would silently train something else, so it is refused with one line naming it. The
options in :data:`CHANGEABLE_ON_RESUME` may change; the new values are used from the resumed update on,
and ``training_config.json`` and the model card record them (the learning rate with its history).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .config import TrainingConfig

CHANGEABLE_ON_RESUME = frozenset(
    {
        "learning_rate",
        "max_train_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "validation_prompts",
        "num_validation_images",
        "validation_reward",
        "validation_features",
        "validation_diversity",
        "num_eval_samples",
        "gradient_checkpointing",
        "cpu_threads",
        "report_to",
        "logging_dir",
        "tracker_project_name",
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
    }
)
"""Options a resumed run may change (everything else must match the checkpoint's config)."""


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=str))


def check_resume_config(saved: dict[str, Any] | None, config: TrainingConfig, checkpoint: str, step: int) -> dict:
    """Compare ``config`` with the ``saved`` config of ``checkpoint`` (at update ``step``).

    Returns {option: (old, new)} of the changed options that may change; raises ValueError naming the
    first option that may not. A checkpoint without a recorded config (older format) is not checked."""
    if config.max_train_steps < step:
        raise ValueError(
            f"`--max_train_steps` {config.max_train_steps} is below update {step} of {checkpoint}; "
            f"pass `--max_train_steps` >= {step}."
        )
    if not saved:
        return {}
    now = _plain(config.to_dict())
    saved = _plain(saved)
    changed = {}
    for name, value in now.items():
        if name not in saved or saved[name] == value:
            continue
        if name not in CHANGEABLE_ON_RESUME:
            raise ValueError(
                f"`--{name}` was {saved[name]!r} in {checkpoint} and is {value!r} now; it cannot change when "
                f"resuming: pass `--{name} {_flag_value(saved[name])}`, or start a new run in another `--output_dir`."
            )
        changed[name] = (saved[name], value)
    return changed


def _flag_value(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "none" if value is None else str(value)


def apply_learning_rate(optimizer: torch.optim.Optimizer, lr_scheduler: Any, learning_rate: float) -> None:
    """Make ``learning_rate`` the base LR of a restored optimizer and (diffusers / torch ``LambdaLR``) schedule,
    keeping the schedule's position: the LR of the next update is ``learning_rate * lambda(step)``."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    scheduler.base_lrs = [float(learning_rate)] * len(optimizer.param_groups)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    for group, base, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, lambdas or [lambda _: 1.0] * len(optimizer.param_groups)
    ):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def learning_rate_text(history: list[tuple[int, float]], steps: int) -> str:
    """The learning rate of a run for its model card: ``3e-3``, or ``3e-3 (updates 1-4), 1e-3 (updates 5-10)``
    when a resume changed it; ``history`` holds (first update, learning rate) pairs in order."""
    if len(history) <= 1:
        return f"{history[0][1]:.4g}" if history else "n/a"
    parts = []
    for i, (start, lr) in enumerate(history):
        end = history[i + 1][0] - 1 if i + 1 < len(history) else steps
        parts.append(f"{lr:.4g} (updates {start}-{end})")
    return ", ".join(parts)
