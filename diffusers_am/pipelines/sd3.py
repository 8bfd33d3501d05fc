"""``AdjointMatchingStableDiffusion3Pipeline``: the stock SD3 pipeline with a controlled
velocity and last-K state recording (states: the latents [B, C, H/8, W/8] themselves)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

from .controlled import ControlledVelocityMixin


@dataclass
class AdjointMatchingStableDiffusion3PipelineOutput(StableDiffusion3PipelineOutput):
    """``images`` plus, with ``record_last_k=K``, ``states`` [K+1, B, C, h, w] and ``times`` [K+1]."""

    states: torch.Tensor | None = None
    times: torch.Tensor | None = None


class AdjointMatchingStableDiffusion3Pipeline(ControlledVelocityMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` + ``control_scale``, ``control_window``, ``record_last_k``.
    With CFG the transformer runs on the batched [uncond, cond] input; the control mixes both
    halves alike, so it commutes with the guidance."""

    output_class = AdjointMatchingStableDiffusion3PipelineOutput

    def prepare_latents(self, *args, **kwargs):
        latents = super().prepare_latents(*args, **kwargs)
        self._am_record(latents)
        return latents

    def _am_state(self, latents: torch.Tensor) -> torch.Tensor:
        return latents
