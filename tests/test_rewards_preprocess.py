"""The torch preprocessing against the PIL bicubic resize + crop / pad the reference rewards use."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusers_am.rewards.clip_preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipPreprocess,
    center_crop,
    pad_to_square,
    resize_longest_side,
    resize_shortest_side,
)

# Stated tolerance vs PIL (uint8 pipeline, bicubic) on smooth natural-like images:
MEAN_ABS_TOL = 3e-3  # mean |difference| in [0, 1] units (measured 1.1e-3 to 2.0e-3: PIL rounds to uint8)
MAX_ABS_TOL = 1.2e-2  # worst pixel (measured 3.6e-3 to 8.3e-3; 1 grey level = 3.9e-3)


def _fixed_image(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(h // 8, 2), max(w // 8, 2), generator=g)
    img = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return (img * 255).round() / 255  # exactly representable as uint8


def _pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _tensor(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil).astype(np.float32) / 255).permute(2, 0, 1)[None]


@pytest.mark.parametrize("h,w,size", [(96, 128, 48), (128, 80, 32), (64, 64, 40), (20, 30, 40)])
def test_shortest_side_crop_matches_pil(h, w, size):
    img = _fixed_image(h, w, seed=h + w)
    ours = center_crop(resize_shortest_side(img, size), size)
    short, long = min(h, w), max(h, w)
    new = (size, int(size * long / short)) if h <= w else (int(size * long / short), size)  # (H, W)
    pil = _pil(img).resize((new[1], new[0]), Image.BICUBIC)
    left, top = int(round((new[1] - size) / 2)), int(round((new[0] - size) / 2))
    ref = _tensor(pil.crop((left, top, left + size, top + size)))
    diff = (ours - ref).abs()
    assert ours.shape == ref.shape == (1, 3, size, size)
    assert diff.mean() < MEAN_ABS_TOL and diff.max() < MAX_ABS_TOL, (diff.mean(), diff.max())


@pytest.mark.parametrize("h,w,size", [(96, 128, 48), (120, 72, 40)])
def test_longest_side_pad_matches_pil(h, w, size):
    img = _fixed_image(h, w, seed=7)
    ours = pad_to_square(resize_longest_side(img, size), size)
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(_pil(img).resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
    diff = (ours - _tensor(canvas)).abs()
    assert diff.mean() < MEAN_ABS_TOL and diff.max() < MAX_ABS_TOL, (diff.mean(), diff.max())
    # the pad is black before normalization
    assert ours[..., :, : (size - nw) // 2].abs().max() == 0 if nw < size else ours[..., : (size - nh) // 2, :].abs().max() == 0


def test_full_preprocess_grey_normalized_and_differentiable():
    img = _fixed_image(40, 60, seed=3)[:, :1].requires_grad_(True)
    out = ClipPreprocess(size=24, rule="shortest")(img)
    assert out.shape == (1, 3, 24, 24)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    back = out * std + mean
    assert torch.allclose(back[:, 0], back[:, 1], atol=1e-5)  # grey repeated
    out.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_bad_preprocess_arguments():
    with pytest.raises(ValueError, match="rule"):
        ClipPreprocess(rule="stretch")
    with pytest.raises(ValueError, match=r"\[B, 1 or 3, H, W\]"):
        ClipPreprocess()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="smaller than the crop"):
        center_crop(torch.rand(1, 3, 8, 8), 16)
