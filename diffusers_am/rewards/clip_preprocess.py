"""Differentiable image preprocessing for CLIP-style reward models, in torch.

Images are float tensors [B, C, H, W] in [0, 1] (C = 1 is repeated to 3). Resizing is
``F.interpolate(mode="bicubic", antialias=True)`` when shrinking *and* enlarging: its kernel is
PIL's bicubic (a = -0.5) and torchvision's, where plain bicubic (a = -0.75) is not.

Two resize rules are in use:
  * ``"shortest"`` (OpenAI CLIP, PickScore, CLIPScore, ImageReward, aesthetic): shortest side to
    ``size`` (the longer: ``int(size * long / short)``), then a center crop of ``size`` x ``size``;
  * ``"longest"`` (HPSv2, open_clip ``resize_longest_max``): longest side to ``size``, then a
    centred zero pad to ``size`` x ``size`` (the pad is black: it is applied before normalizing).

and two details that follow each model's reference pixel pipeline:
  * ``crop``: the crop offset ``(H - size) / 2`` rounded ``"floor"`` (transformers'
    ``CLIPImageProcessor``: PickScore, CLIPScore) or ``"round"`` (torchvision's ``CenterCrop``:
    OpenAI CLIP's preprocess of the aesthetic predictor, ImageReward's BLIP transform);
  * ``clamp``: clip the resized image to [0, 1] as a uint8 resize does (PIL, the processors);
    off for HPSv2, which resizes the float tensor (``ToTensor`` first, torchvision ``resize``) and
    keeps the bicubic overshoot.

Measured gaps to the reference pixels (mean |difference| in [0, 1] units, 224 px, on a
300x200-class image and a large one, shrinking and enlarging) are bounded by 2e-3 in
tests/test_rewards_preprocess.py; the rest is the references' uint8 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..checks import one_of

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_RULES = ("shortest", "longest")
CROP_ROUNDINGS = ("floor", "round")


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """[B, 1 or 3, H, W] -> [B, 3, H, W] (grey repeated)."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"`images` must be [B, 1 or 3, H, W]; got shape {tuple(images.shape)}.")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _resize(images: torch.Tensor, height: int, width: int, clamp: bool = True) -> torch.Tensor:
    """Bicubic resize with antialias in both directions (PIL's kernel); ``clamp`` to [0, 1] like a uint8 resize."""
    if (height, width) == tuple(images.shape[-2:]):
        return images
    out = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0) if clamp else out


def resize_shortest_side(images: torch.Tensor, size: int, clamp: bool = True) -> torch.Tensor:
    """Resize so the shorter side is ``size`` (aspect kept; the longer side as torchvision
    ``Resize(int)`` and transformers compute it: ``int(size * long / short)``)."""
    h, w = images.shape[-2:]
    if h <= w:
        return _resize(images, size, int(size * w / h), clamp)
    return _resize(images, int(size * h / w), size, clamp)


def resize_longest_side(images: torch.Tensor, size: int, clamp: bool = True) -> torch.Tensor:
    """Resize so the longer side is ``size`` (the shorter: ``round(short * size / long)``)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    return _resize(images, round(h * scale), round(w * scale), clamp)


def center_crop(images: torch.Tensor, size: int, rounding: str = "floor") -> torch.Tensor:
    """Crop the central ``size`` x ``size`` window; offset ``(H - size) / 2`` rounded down
    (``"floor"``, transformers) or to nearest-even (``"round"``, torchvision's ``CenterCrop``)."""
    if rounding not in CROP_ROUNDINGS:
        raise UserError(f"center_crop: `rounding` must be one of {CROP_ROUNDINGS}; got {rounding!r}.")
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise UserError(f"center_crop: image {h}x{w} is smaller than the crop size {size}; resize first.")
    offset = (lambda excess: excess // 2) if rounding == "floor" else (lambda excess: int(round(excess / 2.0)))
    top, left = offset(h - size), offset(w - size)
    return images[..., top : top + size, left : left + size]


def pad_to_square(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Centre the image on a ``size`` x ``size`` canvas of ``fill`` (left/top get the floor half)."""
    h, w = images.shape[-2:]
    pad_h, pad_w = size - h, size - w
    if pad_h < 0 or pad_w < 0:
        raise UserError(f"pad_to_square: image {h}x{w} is larger than {size}; resize first.")
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


@dataclass(frozen=True)
class ClipPreprocess:
    """One model's preprocessing: ``size`` px square, ``rule`` in RESIZE_RULES, mean/std, the
    center ``crop`` offset rounding in CROP_ROUNDINGS and whether the resize ``clamp``s to [0, 1]."""

    size: int = 224
    rule: str = "shortest"
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    crop: str = "floor"
    clamp: bool = True

    def __post_init__(self) -> None:
        one_of(self.rule, "rule", RESIZE_RULES)
        one_of(self.crop, "crop", CROP_ROUNDINGS)
        if self.size < 1:
            raise UserError(f"`size` must be a positive pixel count; got {self.size}.")

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1|3, H, W] in [0, 1] -> [B, 3, size, size] resized and cropped / padded, before
        normalizing (fp32 math, differentiable)."""
        x = to_rgb(images).float()
        if self.rule == "shortest":
            return center_crop(resize_shortest_side(x, self.size, self.clamp), self.size, self.crop)
        return pad_to_square(resize_longest_side(x, self.size, self.clamp), self.size)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1|3, H, W] in [0, 1] -> [B, 3, size, size] normalized (fp32 math, differentiable)."""
        return normalize(self.pixels(images), self.mean, self.std)


__all__ = [
    "CROP_ROUNDINGS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "RESIZE_RULES",
    "ClipPreprocess",
    "center_crop",
    "normalize",
    "pad_to_square",
    "resize_longest_side",
    "resize_shortest_side",
    "to_rgb",
]
