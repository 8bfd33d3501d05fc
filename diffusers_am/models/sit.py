"""The trainer's adapter for :class:`~diffusers_am.pipelines.sit.SiTPipeline` (class-conditional SiT).

Conventions (nothing to convert: SiT already lives in paper time):

* states x: [B, in_channels, sample_size, sample_size] fp32: pixels in [-1, 1] for a pixel-space
  model, SD-VAE latents times ``scaling_factor`` for a latent one;
* the velocity is the transformer's first ``in_channels`` output channels at the raw paper
  time t in [0, 1] (SiT's "Linear" path, velocity = x_data - noise);
* time grid: the pipeline's (uniform ``linspace(0, 1, N + 1)`` without a scheduler);
* conditions: integer class labels in [0, num_classes); CFG (``guidance_scale > 1``) batches
  the null class ``num_classes`` with the labels and guides the pipeline's ``guidance_channels``
  (3 of 4 for a converted official checkpoint, as SiT's ``forward_with_cfg``; all by default);
* ``decode``: ``x / 2 + 1/2`` (after ``vae.decode`` for latent models), clamped to [0, 1] in value
  with a straight-through gradient (identity), so that rewards still see a gradient where
  a sample overshoots the pixel range;
* ``default_num_inference_steps``: the pipeline's ``default_num_inference_steps`` config entry
  (``model_index.json``; 50, SiT-XL/2's ODE default, when the entry is absent).
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch

from ..errors import UserError
from ..adjoint import vjp_velocity
from ..checks import positive_int
from ..flow import ConditionedFlow
from ..pipelines.sit import SiTPipeline
from ..deprecation import resolve_dtype
from .base import FlowModelAdapter

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
"""Attention projections and the MLP of every DiT block (diffusers' module names)."""


class SiTFlow:
    """A :class:`~diffusers_am.flow.ConditionedFlow` for one batch of class labels."""

    def __init__(self, adapter: "SiTAdapter", labels: torch.Tensor, guidance_scale: float,
                 train_module: torch.nn.Module | None):
        self.adapter = adapter
        self.labels = labels
        self.guidance_scale = guidance_scale
        self.train_module = train_module

    def _check(self, x: torch.Tensor) -> None:
        if x.shape[0] != self.labels.shape[0]:
            raise UserError(f"states have batch {x.shape[0]} but {self.labels.shape[0]} class labels were encoded.")

    def _base(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.adapter.pipeline.predict_velocity(x, t, self.labels, self.guidance_scale)

    def base_velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """b(x, t) [B, ...] fp32: the transformer with LoRA disabled (for no-grad use: a backward
        through it would run with the LoRA on again; take :meth:`base_vjp` for the adjoint)."""
        self._check(x)
        with self.adapter.adapters_disabled():
            return self._base(x, t)

    def base_vjp(self, x: torch.Tensor, t: torch.Tensor, cotangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b(x, t), J_b^T cotangent) [B, ...] fp32: forward and backward with the LoRA disabled."""
        self._check(x)
        with self.adapter.adapters_disabled():
            return vjp_velocity(self._base, x, t, cotangent)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v_theta(x, t) [B, ...] fp32 through ``train_module`` (or the transformer), LoRA on."""
        self._check(x)
        return self.adapter.pipeline.predict_velocity(
            x, t, self.labels, self.guidance_scale, model=self.train_module
        )

    def rows(self, rows: slice) -> "SiTFlow":
        """The same flow bound to ``rows`` of its labels (micro-batching)."""
        return SiTFlow(self.adapter, self.labels[rows], self.guidance_scale, self.train_module)


class SiTAdapter(FlowModelAdapter):
    """Class-conditional SiT-style flows (the embedded digits base, converted SiT-XL/2)."""

    conditioning = "class"

    def __init__(self, pipeline: SiTPipeline):
        if not isinstance(pipeline, SiTPipeline):
            raise UserError(f"`pipeline` must be a SiTPipeline; got {type(pipeline).__name__}.")
        self.pipeline = pipeline
        self.default_resolution = pipeline.resolution
        self.default_num_inference_steps = int(pipeline.config.get("default_num_inference_steps", 50))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, *, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> "SiTAdapter":
        """Load a SiTPipeline folder (or Hub id) written by ``save_pretrained``, in ``dtype`` (default
        fp32; ``torch_dtype=`` is the deprecated spelling)."""
        dtype = resolve_dtype(dtype, kwargs.pop("torch_dtype", None), torch.float32)
        pipeline = SiTPipeline.from_pretrained(pretrained_model_name_or_path, dtype=dtype, **kwargs)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline)

    # -- LoRA -----------------------------------------------------------------------------
    def default_lora_targets(self) -> list[str]:
        """Attention projections and the MLP of every DiT block."""
        return list(DEFAULT_LORA_TARGETS)

    @classmethod
    def lora_pipeline_class(cls) -> type:
        return SiTPipeline

    # -- sampling geometry ----------------------------------------------------------------
    def _check_resolution(self, resolution: int) -> None:
        if resolution != self.pipeline.resolution:
            raise UserError(
                f"`--resolution` {resolution} does not match this SiT model, built for "
                f"{self.pipeline.resolution}x{self.pipeline.resolution} images; pass --resolution "
                f"{self.pipeline.resolution}."
            )

    def time_grid(self, num_inference_steps: int, resolution: int) -> torch.Tensor:
        """[N+1] paper times 0 .. 1 (the pipeline's grid), fp32 on ``device``."""
        self._check_resolution(resolution)
        return self.pipeline.time_grid(num_inference_steps, device=self.device)

    def initial_noise(self, batch_size: int, resolution: int, generator: torch.Generator | None) -> torch.Tensor:
        """[B, C, s, s] fp32 standard normal states on ``device``."""
        self._check_resolution(resolution)
        positive_int(batch_size, "batch_size")
        return self.pipeline.prepare_latents(batch_size, generator, self.device)

    # -- conditioning ---------------------------------------------------------------------
    def encode_conditions(self, conditions: Sequence[Any]) -> torch.Tensor:
        """Class labels (integers, numpy integers or strings of integers) -> LongTensor [B] on ``device``."""
        labels = []
        for c in conditions:
            if isinstance(c, str) and c.strip().lstrip("-").isdigit():
                c = int(c)
            if isinstance(c, torch.Tensor) and c.dim() == 0 and not c.is_floating_point():
                c = int(c)
            if isinstance(c, bool) or not isinstance(c, numbers.Integral):
                raise UserError(
                    f"`class_labels` for a class-conditional SiT model must be integers in "
                    f"[0, {self.pipeline.num_classes}); got {c!r}."
                )
            labels.append(int(c))
        return self.pipeline.check_class_labels(labels, device=self.device)

    def flow(self, encoded: torch.Tensor, *, guidance_scale: float | None = None,
             train_module: torch.nn.Module | None = None) -> ConditionedFlow:
        """The paper-time flow for labels ``encoded`` [B]; CFG when ``guidance_scale > 1``."""
        scale = 1.0 if guidance_scale is None else float(guidance_scale)
        if not scale >= 0 or scale == float("inf"):
            raise UserError(f"`guidance_scale` must be a finite number >= 0; got {guidance_scale!r}.")
        return SiTFlow(self, encoded, scale, train_module)

    # -- pixels ---------------------------------------------------------------------------
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, s, s] states -> images [B, C_img, H, W] in [0, 1] (straight-through clamp)."""
        images = self.pipeline.decode_states(x) * 0.5 + 0.5
        return images + (images.clamp(0.0, 1.0) - images).detach()
