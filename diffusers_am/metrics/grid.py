"""The one image grid of validation (``validation/*.png``) and evaluation (``samples_<model>.png``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


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

