"""``--quantize_base``: what the trainer does for a bitsandbytes-quantized frozen base, in one place.

A base loaded from a path is quantized by the model adapter's ``from_pretrained`` (:mod:`diffusers_am.models.quantize`:
diffusers' quantization config on a GPU, the same bitsandbytes layers swapped in on a CPU); a pipeline passed from
Python that is already quantized is used as it is, an unquantized one is quantized in place. Sharding engines
(FSDP, DeepSpeed) would shard the packed 4-bit / int8 weights and their quantization state apart, so they are
refused at set-up, as are families without a quantizable transformer and a missing bitsandbytes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.base import FlowModelAdapter


def check_engine(kind: str, accelerator, what: str | None = None) -> None:
    """ValueError in one line when a quantized base (``kind`` != none; ``what`` names it, default the flag) meets
    FSDP or DeepSpeed."""
    from accelerate.utils import DistributedType

    if kind == "none":
        return
    engine = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}.get(
        getattr(accelerator, "distributed_type", None)
    )
    if engine is not None:
        subject = what or f"`--quantize_base {kind}`"
        fix = "pass `--quantize_base none`" if what is None else "pass an unquantized pipeline"
        raise ValueError(
            f"{subject}: {engine} shards the base's weights, and bitsandbytes' packed {kind} weights cannot be "
            f"sharded: run on one process or with DDP (`accelerate launch --multi_gpu`), or {fix}."
        )


def load_options(mode: str, cache_prompt_embeddings: bool, device: torch.device) -> dict[str, Any]:
    """Keyword options of ``load_model_adapter`` for ``--quantize_base mode`` (none: no options). ValueError in
    one line when bitsandbytes is missing."""
    if mode == "none":
        return {}
    from ..models.quantize import require_bitsandbytes

    require_bitsandbytes(mode)
    # cached prompt embeddings free the text encoders right after set-up: quantizing them would only cost time
    return {"quantize_base": mode, "quantize_text_encoders": not cache_prompt_embeddings, "device": device}


def prepare_passed(
    adapter: FlowModelAdapter, mode: str, cache_prompt_embeddings: bool, accelerator, dtype: torch.dtype
) -> FlowModelAdapter:
    """A passed pipeline under ``--quantize_base mode``: used as it is when its transformer is already quantized
    (any method: a line says so when ``mode`` asks for something else), else quantized in place (none: as is)."""
    from ..models.quantize import quantization_of, quantize_pipeline, require_bitsandbytes

    held = quantization_of(adapter.transformer)
    check_engine(held, accelerator, what=f"the pipeline passed has a quantized transformer ({held})")
    if held != "none":
        if mode not in ("none", held):
            accelerator.print(
                f"--quantize_base {mode}: the pipeline passed is already quantized ({held}); used as it is."
            )
        return adapter
    if mode == "none":
        return adapter
    if not adapter.quantizable:
        raise ValueError(
            f"`--quantize_base {mode}` applies to the FLUX.2-klein, FLUX.1 and SD3 transformers; "
            f"{type(adapter).__name__} cannot take a bitsandbytes-quantized base: pass `--quantize_base none`."
        )
    require_bitsandbytes(mode)
    components = ["transformer"]
    if not cache_prompt_embeddings:
        components += [n for n in adapter.pipeline.components if n.startswith("text_encoder")]
    quantize_pipeline(adapter.pipeline, mode, dtype, components)
    return adapter
