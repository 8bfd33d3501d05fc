"""``AdjointMatchingFlux2KleinPipeline``: the stock FLUX.2-klein pipeline with a controlled
velocity (``control_scale``, ``control_window``) and last-K state recording (``record_last_k``).

Recorded states are in :class:`diffusers_am.models.flux2.Flux2KleinAdapter`'s layout:
patchified, normalised latents [B, 128, H/16, W/16].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput

from .controlled import ControlledVelocityMixin


@dataclass
class AdjointMatchingFlux2PipelineOutput(Flux2PipelineOutput):
    """``images`` plus, with ``record_last_k=K``, ``states`` [K+1, B, 128, h, w] and ``times`` [K+1]."""

    states: torch.Tensor | None = None
    times: torch.Tensor | None = None


class AdjointMatchingFlux2KleinPipeline(ControlledVelocityMixin, Flux2KleinPipeline):
    """``Flux2KleinPipeline`` + ``control_scale``, ``control_window``, ``record_last_k`` (see
    :meth:`ControlledVelocityMixin.__call__`). Loads the same folders and LoRA files."""

    output_class = AdjointMatchingFlux2PipelineOutput

    def prepare_latents(self, *args, **kwargs):
        latents, latent_ids = super().prepare_latents(*args, **kwargs)
        self._am_hw = (int(latent_ids[0, :, 1].max()) + 1, int(latent_ids[0, :, 2].max()) + 1)
        self._am_record(latents)
        return latents, latent_ids

    def _am_state(self, latents: torch.Tensor) -> torch.Tensor:
        h, w = self._am_hw
        b, _, c = latents.shape
        return latents.permute(0, 2, 1).reshape(b, c, h, w)
