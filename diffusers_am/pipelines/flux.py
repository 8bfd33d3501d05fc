"""``AdjointMatchingFluxPipeline``: the stock FLUX.1 pipeline with a controlled velocity and
last-K state recording. Recorded states use :class:`diffusers_am.models.flux.FluxAdapter`'s
layout: unpacked latents [B, C, H/8, W/8]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from .controlled import ControlledVelocityMixin


@dataclass
class AdjointMatchingFluxPipelineOutput(FluxPipelineOutput):
    """``images`` plus, with ``record_last_k=K``, ``states`` [K+1, B, C, h, w] and ``times`` [K+1]."""

    states: torch.Tensor | None = None
    times: torch.Tensor | None = None


class AdjointMatchingFluxPipeline(ControlledVelocityMixin, FluxPipeline):
    """``FluxPipeline`` + ``control_scale``, ``control_window``, ``record_last_k``."""

    output_class = AdjointMatchingFluxPipelineOutput

    def prepare_latents(self, batch_size, num_channels_latents, height, width, *args, **kwargs):
        self._am_hw = (int(height), int(width))
        latents, ids = super().prepare_latents(batch_size, num_channels_latents, height, width, *args, **kwargs)
        self._am_record(latents)
        return latents, ids

    def _am_state(self, latents: torch.Tensor) -> torch.Tensor:
        height, width = self._am_hw
        return self._unpack_latents(latents, height, width, self.vae_scale_factor)
