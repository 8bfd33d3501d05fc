"""A fixed photo-like test image for the preprocessing tests: smooth shading, texture, sharp edges."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def textured_image(h: int, w: int, seed: int) -> torch.Tensor:
    """[1, 3, h, w] in [0, 1], exactly representable in uint8: multi-scale noise (cells of ~32, 8
    and 2 px), fine stripes (period 5 px) and six flat rectangles with hard edges."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(1, 3, h, w)
    for cell, amp in ((32, 0.45), (8, 0.2), (2, 0.1)):
        coarse = torch.rand(1, 3, max(h // cell, 2), max(w // cell, 2), generator=g)
        img += amp * F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    angle = float(torch.rand(1, generator=g)) * math.pi
    img += 0.1 * torch.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / 5.0)
    for _ in range(6):
        top, left = int(torch.randint(0, h - h // 4, (1,), generator=g)), int(torch.randint(0, w - w // 4, (1,), generator=g))
        bottom, right = top + h // 5, left + w // 5
        img[..., top:bottom, left:right] = torch.rand(1, 3, 1, 1, generator=g)
    return (img.clamp(0, 1) * 255).round() / 255
