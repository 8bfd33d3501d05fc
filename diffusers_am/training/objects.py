"""What ``AdjointMatchingTrainer`` takes from Python besides the config: a pipeline or model adapter, a reward
callable, a prompt list, a ``peft.LoraConfig`` and callbacks; checked, and recorded honestly in the config.

Objects win over the config's strings. The config the run writes (``training_config.json``, the tracker, the
model card) names what was passed instead of the string it replaced, e.g. reward
``"<callable my_module.my_reward>"`` or pretrained ``"<pipeline object: FluxPipeline>"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .config import TrainingConfig

CALLBACK_METHODS = ("on_train_begin", "on_update_end", "on_save", "on_train_end")
"""The optional methods of a callback object, called on every process (check
``trainer.accelerator.is_main_process`` to act once):

* ``on_train_begin(trainer, ctx)``: after set-up (and a resume), before the base model's evaluation;
  ``ctx`` is the run's :class:`~.context.RunContext`.
* ``on_update_end(trainer, step, record)``: after update ``step`` (1-based) was logged; ``record`` is its
  ``train_log.jsonl`` record (a copy: changing it changes nothing).
* ``on_save(trainer, step, path)``: after the checkpoint of update ``step`` was written (``path``: its
  folder; not called when the save was abandoned), and after the final adapter was written (``path``: the
  ``.safetensors`` file on the main process, None elsewhere).
* ``on_train_end(trainer, result)``: after the run's outputs are written, with the returned ``TrainResult``.
"""


def describe_object(obj: Any) -> str:
    """``"<callable module.qualname>"``, ``"<pipeline object: FluxPipeline>"``, ``"<model adapter object: ...>"``."""
    from ..models.base import FlowModelAdapter

    if isinstance(obj, FlowModelAdapter):
        return f"<model adapter object: {type(obj).__name__}>"
    if hasattr(obj, "components") and hasattr(obj, "transformer"):
        return f"<pipeline object: {type(obj).__name__}>"
    target = obj if hasattr(obj, "__qualname__") else type(obj)
    return f"<callable {getattr(target, '__module__', '?')}.{target.__qualname__}>"


def is_object_record(value: Any) -> bool:
    """Whether a config string is one of :func:`describe_object`'s records (not a name or a path)."""
    return isinstance(value, str) and value.startswith("<") and value.endswith(">")


def check_prompts(prompts: Any) -> list:
    """A non-empty list of prompts (str) or class labels (int); ValueError naming ``prompts`` otherwise."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not len(prompts):
        raise ValueError(
            "`prompts` must be a non-empty list of prompts or class labels (for a prompts file use the config's "
            f"`prompts` field); got {type(prompts).__name__}."
        )
    bad = [p for p in prompts if isinstance(p, bool) or not isinstance(p, (str, int))]
    if bad:
        raise ValueError(f"`prompts` holds {bad[0]!r}: pass strings (text-to-image) or ints (class labels).")
    return list(prompts)


def check_lora_config(lora_config: Any) -> Any:
    """A ``peft.LoraConfig``; ValueError otherwise."""
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"`lora_config` must be a peft.LoraConfig; got {type(lora_config).__name__}.")
    return lora_config


def check_callbacks(callbacks: Any) -> list:
    """A list of objects each with at least one of :data:`CALLBACK_METHODS`; ValueError otherwise."""
    if callbacks is None:
        return []
    items = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    for cb in items:
        if not any(callable(getattr(cb, name, None)) for name in CALLBACK_METHODS):
            raise ValueError(
                f"callback {cb!r} has none of the methods {', '.join(CALLBACK_METHODS)}: add one, or drop it."
            )
    return items


def record_objects(
    config: TrainingConfig, *, pipeline: Any = None, reward: Any = None, prompts: list | None = None,
    lora_config: Any = None,
) -> TrainingConfig:
    """A copy of ``config`` whose fields name the objects that replace them (``config`` is not changed)."""
    changes: dict[str, Any] = {}
    if pipeline is not None:
        changes["pretrained_model_name_or_path"] = describe_object(pipeline)
    if reward is not None:
        changes["reward"] = describe_object(reward)
    if prompts is not None:
        kind = "class labels" if all(isinstance(p, int) for p in prompts) else "prompts"
        changes["prompts"] = f"<list of {len(prompts)} {kind}>"
    if lora_config is not None:
        targets = lora_config.target_modules
        changes.update(
            rank=int(lora_config.r),
            lora_alpha=float(lora_config.lora_alpha),
            lora_dropout=float(lora_config.lora_dropout),
            lora_target_modules=None if targets is None else [targets] if isinstance(targets, str) else sorted(targets),
        )
    return dataclasses.replace(config, **changes) if changes else config


class Callbacks:
    """The trainer's callbacks, called in order; a missing method is skipped."""

    def __init__(self, callbacks: list):
        self.callbacks = list(callbacks)

    def __call__(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if callable(method):
                method(*args)
