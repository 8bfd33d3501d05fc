"""diffusers-am: truncated deterministic adjoint matching for flow-matching pipelines.

The core math (``control``, ``adjoint``, ``schedules``, ``objectives``) is pure torch in
paper time (t = 0 noise, t = 1 data); model adapters under ``models/`` convert each
family's convention at the boundary.

The public names below are imported lazily (``import diffusers_am`` imports neither torch nor diffusers)::

    from diffusers_am import AdjointMatchingTrainer, TrainingConfig
    result = AdjointMatchingTrainer(TrainingConfig(max_train_steps=10), reward=my_reward).train()
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # training
    "AdjointMatchingTrainer": "diffusers_am.training.trainer",
    "TrainingConfig": "diffusers_am.training.config",
    "TrainResult": "diffusers_am.training.outputs",
    "Method": "diffusers_am.training.methods",
    "register_method": "diffusers_am.training.methods",
    # model adapters
    "FlowModelAdapter": "diffusers_am.models",
    "LoraSettings": "diffusers_am.models",
    "load_model_adapter": "diffusers_am.models",
    "model_adapter_for": "diffusers_am.models",
    # rewards
    "load_reward": "diffusers_am.rewards",
    "register_reward": "diffusers_am.rewards",
    "available_rewards": "diffusers_am.rewards",
    # evaluation
    "evaluate": "diffusers_am.evaluate",
    # pipelines
    "AdjointMatchingFlux2KleinPipeline": "diffusers_am.pipelines",
    "AdjointMatchingFluxPipeline": "diffusers_am.pipelines",
    "AdjointMatchingStableDiffusion3Pipeline": "diffusers_am.pipelines",
    "SiTPipeline": "diffusers_am.pipelines",
}
"""Public name -> the module it comes from (imported on first access)."""

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffusers_am' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
