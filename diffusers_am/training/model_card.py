"""The adapter's model card: ``model_card_template.md`` rendered with ``huggingface_hub.ModelCard``.

The template is package data beside this module (an installed wheel carries it); the top-level
``model_card_template.md`` of the repository is a symlink to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .methods import METHODS

TEMPLATE = Path(__file__).resolve().with_name("model_card_template.md")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_model_card(
    *,
    base_model: str,
    method: str,
    truncate_steps: int,
    num_inference_steps: int,
    reg_order: float,
    reward: str,
    reward_scale: float,
    steps: int,
    reward_before: float | None,
    reward_after: float | None,
    final_metrics: dict[str, Any],
    grid: str,
    pipeline_class: str,
    pipeline_module: str,
    adapter_location: str,
    conditioning: str = "text",
    base_grid: str | None = None,
    base_quantization: str = "none",
    template_path: str | Path | None = None,
    **settings: Any,
):
    """A ``huggingface_hub.ModelCard`` for the run (nothing is downloaded: local template)."""
    from huggingface_hub import ModelCard, ModelCardData

    template_path = Path(template_path or TEMPLATE)
    if not template_path.is_file():
        raise ValueError(f"model card template {str(template_path)!r} not found.")
    from ..models import EMBEDDED_DIGITS_BASE, EMBEDDED_NAMES

    object_record = str(base_model).startswith("<")  # "<pipeline object: ...>": passed from Python, no id known
    shipped = next((name for name, folder in EMBEDDED_NAMES.items() if str(base_model).lower() == name
                    or (not object_record and Path(base_model).resolve() == folder.resolve())), None)
    hub_base = None if object_record or shipped or Path(base_model).exists() else base_model  # Hub ids only
    data = ModelCardData(
        library_name="diffusers",
        base_model=hub_base,
        tags=["diffusers", "lora", "adjoint-matching", method, "reward-fine-tuning"],
        license=settings.pop("license", None),
    )
    kind = "class labels" if conditioning == "class" else "prompts"
    embedded = Path(base_model).resolve() == EMBEDDED_DIGITS_BASE.resolve()
    known = METHODS.get(method)
    method_name = known.display_name if known is not None else method
    base_ref = "EMBEDDED_DIGITS_BASE" if embedded else json.dumps(str(base_model))
    base_import = "from diffusers_am.models import EMBEDDED_DIGITS_BASE" if embedded else None
    if shipped:  # a pipeline shipped in the package (shapes-klein): load it by its constant
        constant = "EMBEDDED_" + shipped.upper().replace("-", "_")
        base_ref, base_import = constant, f"from diffusers_am.models import {constant}"
    return ModelCard.from_template(
        data,
        template_path=str(template_path),
        title=f"{method_name[0].upper()}{method_name[1:]} LoRA for "
        f"{'the embedded digits base' if embedded else Path(base_model).name}",
        base_model="the embedded digits base (diffusers_am/assets/digits-sit)" if embedded else base_model,
        base_model_ref=base_ref,
        base_import=base_import,
        method=method,
        method_name=method_name,
        truncate_steps=truncate_steps,
        num_inference_steps=num_inference_steps,
        reg_order=_fmt(reg_order) if known and known.uses_reg_order else f"{_fmt(reg_order)} (unused by {method})",
        reward=reward,
        reward_scale=_fmt(reward_scale),
        steps=steps,
        reward_before=_fmt(reward_before),
        reward_after=_fmt(reward_after),
        final_metrics=", ".join(f"{k} = {_fmt(v)}" for k, v in final_metrics.items()) or "n/a",
        grid=grid,
        base_grid=base_grid,
        base_quantization=base_quantization,
        pipeline_class=pipeline_class,
        pipeline_module=pipeline_module,
        adapter_location=adapter_location,
        condition_kind=kind,
        condition_kind_singular=kind[:-1],
        **{k: _fmt(v) if not isinstance(v, bool) else v for k, v in settings.items()},
    )
