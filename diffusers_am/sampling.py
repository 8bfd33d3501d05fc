"""The one sampler of training validation and ``python -m diffusers_am.evaluate``: Euler in paper time
through a model adapter, for a list of prompts (or class labels) and given seeded noise, in batches;
the base model (LoRA off) or the model with its LoRA ("adapter") on."""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch

from .errors import UserError
from .flow import sample_euler
from .checks import positive_int
from .models.base import FlowModelAdapter


@torch.no_grad()
def sample_images(
    adapter: FlowModelAdapter,
    conditions: Sequence[Any],
    noise: torch.Tensor,
    times: torch.Tensor,
    *,
    guidance_scale: float | None = None,
    base: bool = False,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-sample ``noise`` [B, ...] along ``times`` [N+1] and decode, ``chunk_size`` at a time.

    ``base=True`` runs the base model (LoRA disabled). Returns (terminal states [B, ...], images
    [B, C, H, W] in [0, 1]), both fp32 on the adapter's device."""
    if len(conditions) != noise.shape[0]:
        raise UserError(
            f"`conditions` ({len(conditions)}) and `noise` ({noise.shape[0]}) must have the same batch size."
        )
    positive_int(chunk_size, "chunk_size")
    states, images = [], []
    ctx = adapter.adapters_disabled() if base else contextlib.nullcontext()
    with ctx:
        for start in range(0, len(conditions), chunk_size):
            chunk = list(conditions[start : start + chunk_size])
            flow = adapter.flow(adapter.encode_conditions(chunk), guidance_scale=guidance_scale)
            x = sample_euler(flow.velocity, noise[start : start + chunk_size], times)[-1]
            states.append(x)
            images.append(adapter.decode(x).float().clamp(0, 1))
    return torch.cat(states), torch.cat(images)
