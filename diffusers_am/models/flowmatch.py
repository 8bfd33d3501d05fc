"""Shared plumbing for adapters of diffusers FlowMatch pipelines (FLUX.2-klein, FLUX.1, SD3).

Conventions at the boundary (paper time t: 0 noise, 1 data):
    t = 1 - sigma,    b(x, t) = -v_model(x, sigma),
because the stock schedulers step ``x <- x + (sigma_next - sigma) * v_model`` from sigma = 1
(noise) to 0 (data). The state is the pipeline's latent in image layout [B, C, h, w] (fp32);
each family packs / patchifies it for its transformer.

A family subclass implements :meth:`FlowMatchAdapter._sigmas` (the pipeline's own schedule),
:meth:`FlowMatchAdapter._predict` (one guided transformer prediction in sigma time),
:meth:`FlowMatchAdapter._encode`, :meth:`FlowMatchAdapter.initial_noise`,
:meth:`FlowMatchAdapter.decode` and :meth:`FlowMatchAdapter.default_lora_targets`.
"""

from __future__ import annotations

import abc
import warnings
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from ..errors import UserError
from ..adjoint import vjp_velocity
from ..checks import positive_int
from ..deprecation import resolve_dtype
from .base import FlowModelAdapter
from .lora import unmatched_lora_targets  # noqa: F401  (re-exported)


class PaperTimeFlow:
    """A :class:`~diffusers_am.flow.ConditionedFlow` over one encoded batch of a FlowMatch adapter."""

    def __init__(self, adapter: "FlowMatchAdapter", encoded: Any, guidance_scale: float | None, train_module: torch.nn.Module | None):
        self.adapter = adapter
        self.encoded = encoded
        self.guidance_scale = guidance_scale
        self.train_module = train_module

    def _velocity(self, module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = 1.0 - torch.as_tensor(t, dtype=torch.float32, device=x.device)
        return -self.adapter._predict(module, x, sigma, self.encoded, self.guidance_scale).float()

    def _base(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._velocity(self.adapter.transformer, x, t)

    def base_velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """b(x, t) [B, C, h, w] fp32 with the LoRA disabled (for no-grad use: a backward through it
        would run with the LoRA on again; take :meth:`base_vjp` for the adjoint)."""
        with self.adapter.adapters_disabled():
            return self._base(x, t)

    def base_vjp(self, x: torch.Tensor, t: torch.Tensor, cotangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b(x, t), J_b^T cotangent) [B, C, h, w] fp32: forward and backward with the LoRA disabled."""
        with self.adapter.adapters_disabled():
            return vjp_velocity(self._base, x, t, cotangent)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v_theta(x, t) [B, C, h, w] fp32 through ``train_module`` (or the transformer)."""
        return self._velocity(self.train_module or self.adapter.transformer, x, t)

    def rows(self, rows: slice) -> "PaperTimeFlow":
        """The same flow bound to ``rows`` of its encoded batch (micro-batching)."""
        from ..batching import select_rows

        batch = self.adapter._encoded_batch(self.encoded)
        encoded = select_rows(self.encoded, rows, batch)
        return PaperTimeFlow(self.adapter, encoded, self.guidance_scale, self.train_module)


class FlowMatchAdapter(FlowModelAdapter):
    """Common part of the FlowMatch families: loading, LoRA, time grid, prompt caching, CFG switch.

    Args:
        pipeline: a loaded stock pipeline of the family (or our controlled subclass).
        offload_text_encoder: keep text encoders on the CPU except while encoding a batch.
        max_sequence_length: prompt length for the text encoder (None: the pipeline's default).
    """

    pipeline_class_name: ClassVar[str]
    options = ("offload_text_encoder", "max_sequence_length")
    conditioning = "text"
    quantizable = True
    default_num_inference_steps = 20
    default_resolution = 256
    default_guidance_scale: ClassVar[float] = 1.0

    def __init__(self, pipeline: Any, *, offload_text_encoder: bool = False, max_sequence_length: int | None = None):
        if max_sequence_length is not None and (isinstance(max_sequence_length, bool) or int(max_sequence_length) < 1):
            raise UserError(f"`max_sequence_length` must be a positive integer or None; got {max_sequence_length!r}.")
        self.pipeline = pipeline
        self.offload_text_encoder = bool(offload_text_encoder)
        self.max_sequence_length = max_sequence_length

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def _pipeline_class(cls) -> type:
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str,
        *,
        dtype: torch.dtype | None = None,
        offload_text_encoder: bool = False,
        max_sequence_length: int | None = None,
        device: torch.device | str | None = None,
        quantize_base: str = "none",
        quantize_text_encoders: bool = True,
        **kwargs: Any,
    ) -> "FlowMatchAdapter":
        """Load with the stock pipeline's ``from_pretrained`` (folder or Hub id; extra kwargs such
        as ``revision`` / ``variant`` go to it); the VAE and text encoders are frozen.

        ``quantize_base`` ``nf4`` / ``int8`` quantizes the transformer (and, with ``quantize_text_encoders``,
        the text encoders) with bitsandbytes (:mod:`.quantize`): loaded through diffusers'
        ``PipelineQuantizationConfig`` when ``device`` is a GPU (or None with a GPU present), else loaded in
        ``dtype`` and quantized in place on the CPU; bitsandbytes computes in ``dtype``."""
        dtype = resolve_dtype(dtype, kwargs.pop("torch_dtype", None), torch.float32)
        quantized = cls._quantized_components(quantize_base, quantize_text_encoders, pretrained_model_name_or_path)
        on_gpu = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
        if quantized and on_gpu:
            from .quantize import pipeline_quantization_config

            kwargs["quantization_config"] = pipeline_quantization_config(quantize_base, dtype, quantized)
        pipeline = cls._pipeline_class().from_pretrained(pretrained_model_name_or_path, dtype=dtype, **kwargs)
        if quantized and not on_gpu:
            from .quantize import quantize_pipeline

            quantize_pipeline(pipeline, quantize_base, dtype, quantized)
        adapter = cls(pipeline, offload_text_encoder=offload_text_encoder, max_sequence_length=max_sequence_length)
        for module in adapter._frozen_modules():
            module.requires_grad_(False)
        if device is not None:
            adapter.to(device)
        return adapter

    @classmethod
    def _quantized_components(cls, mode: str, text_encoders: bool, path: str) -> list[str]:
        """The components ``--quantize_base mode`` quantizes: [] for none, else the transformer and (when
        ``text_encoders``) the pipeline's text encoders, read from ``model_index.json`` of ``path``.
        ValueError in one line when bitsandbytes is missing."""
        from .quantize import check_mode, require_bitsandbytes

        if check_mode(mode) == "none":
            return []
        require_bitsandbytes(mode)
        names = ["transformer"]
        if text_encoders:
            from . import read_model_index

            index = read_model_index(path)
            present = (n for n, v in index.items() if isinstance(v, list) and v[0])  # [library, class] or [None, None]
            names += sorted(n for n in present if n.startswith("text_encoder"))
        return names

    def _frozen_modules(self) -> list[torch.nn.Module]:
        return [m for m in (getattr(self.pipeline, n, None) for n in self.pipeline.components) if isinstance(m, torch.nn.Module)]

    def _text_encoders(self) -> list[torch.nn.Module]:
        return [m for name, m in self.pipeline.components.items() if name.startswith("text_encoder") and isinstance(m, torch.nn.Module)]

    def to(self, device: torch.device | str) -> "FlowMatchAdapter":
        for name, module in self.pipeline.components.items():
            if isinstance(module, torch.nn.Module) and not (self.offload_text_encoder and name.startswith("text_encoder")):
                module.to(device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # -- LoRA -----------------------------------------------------------------------------
    @classmethod
    def lora_pipeline_class(cls) -> type:
        return cls._pipeline_class()

    # -- time -----------------------------------------------------------------------------
    def resolution_multiple(self) -> int:
        """What a resolution must be a multiple of: the VAE's factor times the 2x2 latent packing (or patch)."""
        return self.pipeline.vae_scale_factor * 2

    def check_resolution(self, resolution: int) -> int:
        multiple = self.resolution_multiple()
        if isinstance(resolution, bool) or int(resolution) != resolution or resolution < multiple or resolution % multiple:
            raise UserError(
                f"`resolution` (height and width) must be a positive multiple of {multiple} for "
                f"{type(self.pipeline).__name__}; got {resolution!r}."
            )
        return int(resolution)

    @staticmethod
    def _check_steps(num_inference_steps: int) -> int:
        return positive_int(num_inference_steps, "num_inference_steps")

    @abc.abstractmethod
    def _sigmas(self, num_inference_steps: int, resolution: int) -> torch.Tensor:
        """[N+1] the pipeline's sigmas (1 .. 0, terminal 0 included) for this size."""

    def time_grid(self, num_inference_steps: int, resolution: int) -> torch.Tensor:
        """[N+1] paper times 1 - sigma_k, increasing from 0 to 1, fp32 on the device."""
        sigmas = self._sigmas(self._check_steps(num_inference_steps), self.check_resolution(resolution))
        return (1.0 - sigmas.double()).float().to(self.device)

    def _fresh_scheduler(self):
        scheduler = self.pipeline.scheduler
        return type(scheduler).from_config(scheduler.config)

    # -- conditioning ---------------------------------------------------------------------
    @abc.abstractmethod
    def _encode(self, prompts: list[str], device: torch.device) -> Any:
        """Encode prompts with the pipeline's own ``encode_prompt`` (called under no_grad)."""

    def encode_conditions(self, conditions: Sequence[Any]) -> Any:
        """Encode a batch of prompts once; with ``offload_text_encoder`` the encoders visit the
        transformer's device only for this call. Prompts held by :meth:`cache_prompts`' cache come from it."""
        prompts = [conditions] if isinstance(conditions, str) else list(conditions)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise UserError(f"`conditions` must be a non-empty list of prompt strings; got {conditions!r}.")
        cache = getattr(self, "prompt_cache", None)
        if cache is not None and all(p in cache for p in prompts):
            return cache.encode(prompts)
        if not self._text_encoders():
            raise UserError(
                f"prompt(s) {[p for p in prompts if cache is None or p not in cache][:3]!r} are not in the prompt "
                "cache and the text encoders were freed: add them to the prompts cached at set-up."
            )
        return self._encode_uncached(prompts)

    def _encode_uncached(self, prompts: list[str]) -> Any:
        device = self.device
        encoders = self._text_encoders()
        if self.offload_text_encoder:
            for enc in encoders:
                enc.to(device)
        try:
            with torch.no_grad():
                return self._encode(prompts, device)
        finally:
            if self.offload_text_encoder:
                for enc in encoders:
                    enc.to("cpu")

    def cache_prompts(
        self, prompts: Sequence[str], *, chunk_size: int = 16, cache_dir: str | None = None,
        free_text_encoders: bool = True, key: str = "",
    ) -> tuple[int, int, int]:
        """Encode ``prompts`` once (in chunks of ``chunk_size``; read from / written to ``cache_dir`` as
        safetensors when given) so :meth:`encode_conditions` never runs the text encoders again, then
        (``free_text_encoders``) drop them from the pipeline. ``key`` names the model in the disk cache.

        Returns (prompts cached, bytes of the cache, bytes of text encoders freed)."""
        from .prompt_cache import PromptEmbeddingCache, cache_key, module_bytes

        unique = list(dict.fromkeys(prompts))
        cache, path = None, None
        if cache_dir is not None:
            digest = cache_key(key, type(self).__name__, self.dtype, self.max_sequence_length, unique)
            path = Path(cache_dir) / f"prompt_embeddings-{digest}.safetensors"
            cache = PromptEmbeddingCache.load(path, digest, self._encoded_type())
            if cache is not None:
                cache.to(self.device)
        if cache is None:
            cache = PromptEmbeddingCache.build(self._encode_uncached, unique, chunk_size)
            if path is not None:
                cache.save(path, digest)
        self.prompt_cache = cache
        freed = 0
        if free_text_encoders:
            for name, module in list(self.pipeline.components.items()):
                if name.startswith("text_encoder") and isinstance(module, torch.nn.Module):
                    freed += module_bytes(module)
                    setattr(self.pipeline, name, None)
            import gc

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return len(cache), cache.nbytes, freed

    @staticmethod
    def _encoded_batch(encoded: Any) -> int:
        """Prompts in an encoded batch (dim 0 of its ``prompt_embeds``)."""
        return int(encoded.prompt_embeds.shape[0])

    def _encoded_type(self) -> type:
        """The dataclass :meth:`_encode` returns (from its return annotation)."""
        import typing

        return typing.get_type_hints(type(self)._encode)["return"]

    def resolve_guidance(self, guidance_scale: float | None) -> float:
        """The guidance scale to use (None: the family default)."""
        g = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        if not g == g or g < 0:
            raise UserError(f"`guidance_scale` must be a number >= 0; got {guidance_scale!r}.")
        return g

    @abc.abstractmethod
    def _predict(self, module: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, encoded: Any, guidance_scale: float | None) -> torch.Tensor:
        """The (guided) model prediction in sigma time, [B, C, h, w], for states x [B, C, h, w]."""

    def flow(self, encoded: Any, *, guidance_scale: float | None = None, train_module: torch.nn.Module | None = None) -> PaperTimeFlow:
        self.resolve_guidance(guidance_scale)
        return PaperTimeFlow(self, encoded, guidance_scale, train_module)

    def _noise(self, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    @staticmethod
    def _warn(message: str) -> None:
        warnings.warn(message, UserWarning, stacklevel=3)
