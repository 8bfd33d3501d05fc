"""A quantized frozen base (``--quantize_base nf4 | int8``) under a LoRA kept in the training dtype (QLoRA style).

Two routes to the same bitsandbytes layers (``bnb.nn.Linear4bit`` with NF4 / ``bnb.nn.Linear8bitLt``):

- on a GPU the pipeline is loaded through diffusers' own quantization config
  (:func:`pipeline_quantization_config`: a ``PipelineQuantizationConfig`` over the transformer and, unless the
  prompt embeddings are cached, the text encoders);
- on a CPU, where diffusers' bitsandbytes quantizer refuses to load ("A GPU is needed for quantization"),
  :func:`quantize_module` quantizes the loaded model in place with that same quantizer's own steps: its
  ``preprocess_model`` (``replace_with_bnb_linear`` swaps every ``nn.Linear`` for an empty bitsandbytes layer),
  then ``create_quantized_param`` with the loaded weights (``Params4bit`` / ``Int8Params``, quantized by
  bitsandbytes when placed on the device), then ``postprocess_model``.

PEFT puts its LoRA on these layers (``peft.tuners.lora.bnb``); the LoRA weights stay fp32. bitsandbytes is
imported only here and only when a quantized base is asked for.

The trainer's side (:func:`check_engine`, :func:`load_options`, :func:`prepare_passed`): a pipeline passed from
Python that is already quantized is used as it is, an unquantized one is quantized in place; sharding engines
(FSDP, DeepSpeed) would shard the packed weights and their quantization state apart, so they are refused at
set-up, as are families without a quantizable transformer and a missing bitsandbytes.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

import torch

from ..errors import UserError
from ..checks import one_of
from .base import FlowModelAdapter

QUANTIZE_CHOICES = ("none", "nf4", "int8")
"""Values of ``--quantize_base``."""

TEXT_ENCODER_SKIP = ("lm_head",)
"""Text-encoder modules kept unquantized (the output head, as transformers' bitsandbytes loading keeps it)."""


def require_bitsandbytes(mode: str):
    """The ``bitsandbytes`` module (imported by :func:`diffusers_am.bnb.import_bitsandbytes`, the one place);
    ValueError in one line (the install command) when it is missing."""
    from ..bnb import import_bitsandbytes

    try:
        return import_bitsandbytes(f"--quantize_base {mode}")
    except ValueError:
        raise UserError(
            f"`--quantize_base {mode}` needs bitsandbytes: `pip install bitsandbytes` (or `pip install "
            "diffusers-am[bnb]`), or pass `--quantize_base none`."
        ) from None


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`QUANTIZE_CHOICES`, else ValueError in one line."""
    return one_of(mode, "--quantize_base", QUANTIZE_CHOICES)


def bnb_config(mode: str, compute_dtype: torch.dtype, skip: Iterable[str] = ()):
    """diffusers' ``BitsAndBytesConfig`` for ``mode``: NF4 (no double quantization) computing in
    ``compute_dtype``, or LLM.int8 (int8 weights, outlier threshold 6); ``skip`` modules stay unquantized."""
    from diffusers import BitsAndBytesConfig

    skip = list(skip) or None
    if check_mode(mode) == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise UserError("`--quantize_base none` has no quantization config.")


def pipeline_quantization_config(mode: str, compute_dtype: torch.dtype, components: Iterable[str]):
    """The ``PipelineQuantizationConfig`` the GPU route passes to the pipeline's ``from_pretrained``:
    bitsandbytes ``mode`` on ``components`` (the transformer, and text encoders when listed)."""
    from diffusers.quantizers import PipelineQuantizationConfig

    check_mode(mode)
    if mode == "nf4":
        backend = "bitsandbytes_4bit"
        kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype}
    else:
        backend, kwargs = "bitsandbytes_8bit", {"load_in_8bit": True}
    return PipelineQuantizationConfig(
        quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=list(components)
    )


def quantize_module(
    module: torch.nn.Module, mode: str, compute_dtype: torch.dtype, skip: Iterable[str] = ()
) -> torch.nn.Module:
    """Quantize a loaded model in place (its ``nn.Linear`` layers, except ``skip`` and the model's
    ``_keep_in_fp32_modules``) with diffusers' bitsandbytes quantizer, on the device its weights are on.
    The model then looks as if diffusers had loaded it quantized (``is_quantized``, ``hf_quantizer``,
    ``config.quantization_config``). Returns ``module``."""
    require_bitsandbytes(mode)
    from accelerate.utils import set_module_tensor_to_device
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer, BnB8BitDiffusersQuantizer

    config = bnb_config(mode, compute_dtype, skip)
    quantizer = (BnB4BitDiffusersQuantizer if mode == "nf4" else BnB8BitDiffusersQuantizer)(config, pre_quantized=False)
    weights = dict(module.state_dict(keep_vars=True))  # the loaded tensors, before the swap empties the layers
    device = next((t.device for t in weights.values() if t.device.type != "meta"), torch.device("cpu"))
    keep_fp32 = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    quantizer.preprocess_model(model=module, device_map=None, keep_in_fp32_modules=keep_fp32)
    with torch.no_grad():
        for name, value in weights.items():
            if quantizer.check_if_quantized_param(module, value, name, weights):
                quantizer.create_quantized_param(module, value.detach(), name, device, weights)
            elif _tensor(module, name).device.type == "meta":  # emptied by the swap and not quantized (a bias)
                set_module_tensor_to_device(module, name, device, value=value.detach())
    quantizer.postprocess_model(module)
    module.hf_quantizer = quantizer
    module.requires_grad_(False)
    if device.type == "cpu":  # own copies of the weights left as loaded: they may be views of the checkpoint's
        _own_storage(module)  # memory map, which would keep the whole file (the replaced weights too) mapped
    return module


def _own_storage(module: torch.nn.Module) -> None:
    """Give every unquantized parameter and buffer of ``module`` its own storage (a copy)."""
    bnb = sys.modules["bitsandbytes"]
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if not isinstance(tensor, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
                tensor.data = tensor.data.clone()


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner), leaf)


def quantize_pipeline(pipeline: Any, mode: str, compute_dtype: torch.dtype, components: Iterable[str]) -> list[str]:
    """:func:`quantize_module` on each named pipeline component present (text encoders keep their output head
    unquantized); returns the components quantized."""
    done = []
    for name in components:
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            quantize_module(module, mode, compute_dtype, TEXT_ENCODER_SKIP if name.startswith("text_encoder") else ())
            done.append(name)
    return done


def quantization_of(module: torch.nn.Module | None) -> str:
    """How ``module``'s weights are quantized: ``nf4`` / ``fp4`` / ``int8`` (bitsandbytes layers), the method
    name of another quantizer (``torchao``, ``gguf``, ...), or ``none``. Never imports bitsandbytes."""
    if module is None:
        return "none"
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        for layer in module.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                return str(getattr(layer.weight, "quant_type", None) or "4bit")
            if isinstance(layer, bnb.nn.Linear8bitLt):
                return "int8"
    if getattr(module, "is_quantized", False) or getattr(module, "hf_quantizer", None) is not None:
        method = getattr(module, "quantization_method", None)
        return str(getattr(method, "value", method) or "quantized")
    return "none"


def describe(pipeline: Any) -> str:
    """One line for the model card: which components of ``pipeline`` are quantized, and how."""
    parts = []
    for name, module in getattr(pipeline, "components", {}).items():
        if isinstance(module, torch.nn.Module):
            kind = quantization_of(module)
            if kind != "none":
                parts.append(f"{name} {kind}")
    return ", ".join(parts) if parts else "none"


# -- the trainer's side: load options, a passed pipeline, the engines refused ---------------------------


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
        raise UserError(
            f"{subject}: {engine} shards the base's weights, and bitsandbytes' packed {kind} weights cannot be "
            f"sharded: run on one process or with DDP (`accelerate launch --multi_gpu`), or {fix}."
        )


def load_options(mode: str, cache_prompt_embeddings: bool, device: torch.device) -> dict[str, Any]:
    """Keyword options of ``load_model_adapter`` for ``--quantize_base mode`` (none: no options). ValueError in
    one line when bitsandbytes is missing."""
    if mode == "none":
        return {}

    require_bitsandbytes(mode)
    # cached prompt embeddings free the text encoders right after set-up: quantizing them would only cost time
    return {"quantize_base": mode, "quantize_text_encoders": not cache_prompt_embeddings, "device": device}


def prepare_passed(
    adapter: FlowModelAdapter, mode: str, cache_prompt_embeddings: bool, accelerator, dtype: torch.dtype
) -> FlowModelAdapter:
    """A passed pipeline under ``--quantize_base mode``: used as it is when its transformer is already quantized
    (any method: a line says so when ``mode`` asks for something else), else quantized in place (none: as is)."""
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
        raise UserError(
            f"`--quantize_base {mode}` applies to the FLUX.2-klein, FLUX.1 and SD3 transformers; "
            f"{type(adapter).__name__} cannot take a bitsandbytes-quantized base: pass `--quantize_base none`."
        )
    require_bitsandbytes(mode)
    components = ["transformer"]
    if not cache_prompt_embeddings:
        components += [n for n in adapter.pipeline.components if n.startswith("text_encoder")]
    quantize_pipeline(adapter.pipeline, mode, dtype, components)
    return adapter
