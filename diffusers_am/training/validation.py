"""Sampling for validation grids and the before / after reward, through the adapter interface only."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..flow import sample_euler
from ..models.base import FlowModelAdapter


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
    """Euler-sample ``noise`` [B, ...] along ``times`` [N+1] and decode.

    ``base=True`` runs the base model (LoRA disabled). Returns (terminal states [B, ...], images
    [B, C, H, W] in [0, 1]), both fp32 on the adapter's device."""
    if len(conditions) != noise.shape[0]:
        raise ValueError(
            f"`conditions` ({len(conditions)}) and `noise` ({noise.shape[0]}) must have the same batch size."
        )
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


@torch.no_grad()
def mean_reward(
    reward: Callable, images: torch.Tensor, conditions: Sequence[Any], chunk_size: int = 32
) -> torch.Tensor:
    """Rewards [B] of images [B, C, H, W] (fp32, on CPU)."""
    out = [
        reward(images[i : i + chunk_size], list(conditions[i : i + chunk_size])).float().cpu()
        for i in range(0, len(conditions), chunk_size)
    ]
    return torch.cat(out)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2):
    """A PIL image tiling ``images`` [B, C, H, W] in [0, 1] row-major, ``nrow`` images per row."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"`images` must be [B, C, H, W] with C in (1, 3); got {tuple(images.shape)}.")
    b, c, h, w = images.shape
    cols = max(1, min(nrow, b))
    rows = (b + cols - 1) // cols
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8) * 255
    pixels = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    for i in range(b):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y : y + h, x : x + w] = pixels[i]
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if max(image.size) < 256:  # tiny images (digits are 8x8): upscale (nearest) so the grid is legible
        scale = 512 // max(image.size)
        image = image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
    return image


def save_grid(images: torch.Tensor, nrow: int, path: str | Path) -> Path:
    """Write ``image_grid(images, nrow)`` as PNG to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow).save(path)
    return path
