"""The LoRA ("adapter") on a model adapter's transformer, written once for every family.

PEFT does the work (``transformer.add_adapter``, ``get_peft_model_state_dict``); the trainable
LoRA weights are cast to fp32 with ``diffusers.training_utils.cast_training_params`` while the
frozen base weights keep the load dtype. Saving goes through the pipeline class's
``save_lora_weights`` (diffusers format, ``pytorch_lora_weights.safetensors``, the LoraConfig
as metadata), so ``pipe.load_lora_weights`` reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from ..errors import UserError


@dataclass
class LoraSettings:
    """The project's LoRA settings (``--rank``, ``--lora_alpha``, ``--lora_target_modules``,
    ``--lora_dropout``). ``target_modules=None`` takes the family's default targets; ``alpha=None``
    means alpha = rank."""

    rank: int = 16
    alpha: float | None = None
    target_modules: Sequence[str] | None = None
    dropout: float = 0.0
    init_lora_weights: bool | str = True


def is_lora_target(module: torch.nn.Module) -> bool:
    """Whether PEFT can put a LoRA on ``module`` (Linear, Conv1d/2d, Embedding)."""
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Embedding))


def unmatched_lora_targets(model: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """Targets (PEFT suffix semantics: ``name == target`` or ``name`` ends with ``.target``)
    that match no LoRA-capable module of ``model``."""
    names = [name for name, module in model.named_modules() if is_lora_target(module)]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def has_lora(model: torch.nn.Module) -> bool:
    """Whether a PEFT adapter was added to (or loaded into) ``model``."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def lora_config(settings: Any, default_targets: Sequence[str], model: torch.nn.Module):
    """A ``peft.LoraConfig`` from :class:`LoraSettings` (or a LoraConfig, returned as is), checked
    against ``model``: ValueError naming a bad rank or a target that matches no module."""
    from peft import LoraConfig

    if isinstance(settings, LoraConfig):
        return settings
    if not isinstance(settings, LoraSettings):
        raise UserError(f"`settings` must be a LoraSettings or a peft.LoraConfig; got {type(settings).__name__}.")
    if isinstance(settings.rank, bool) or not isinstance(settings.rank, int) or settings.rank < 1:
        raise UserError(f"LoRA `rank` must be a positive integer; got {settings.rank!r}.")
    targets = list(settings.target_modules) if settings.target_modules else list(default_targets)
    missing = unmatched_lora_targets(model, targets)
    if missing:
        raise UserError(
            f"LoRA target(s) {missing} match no Linear/Conv module of {type(model).__name__}; "
            f"fix `target_modules` (default for this family: {list(default_targets)})."
        )
    return LoraConfig(
        r=int(settings.rank),
        lora_alpha=float(settings.alpha if settings.alpha is not None else settings.rank),
        target_modules=targets,
        lora_dropout=float(settings.dropout),
        init_lora_weights=settings.init_lora_weights,
    )


def add_lora(model: torch.nn.Module, config: Any) -> list[torch.nn.Parameter]:
    """Freeze ``model``, add the PEFT adapter ``config``, make its weights trainable fp32; returns
    them in ``named_parameters`` order. ValueError if ``model`` already has one."""
    from diffusers.training_utils import cast_training_params

    if has_lora(model):
        raise UserError("the transformer already has a LoRA adapter: load a fresh pipeline to add another.")
    model.requires_grad_(False)
    model.add_adapter(config)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    cast_training_params(model, dtype=torch.float32)
    return params


def save_lora(pipeline_class: type, model: torch.nn.Module, save_directory: str, **kwargs: Any) -> None:
    """``pipeline_class.save_lora_weights`` with ``model``'s PEFT state dict and its LoraConfig as metadata."""
    from peft.utils import get_peft_model_state_dict

    if not has_lora(model):
        raise UserError("no LoRA adapter to save: call `add_lora` first.")
    config = model.peft_config["default"]
    pipeline_class.save_lora_weights(
        save_directory,
        transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict(),
        **kwargs,
    )
