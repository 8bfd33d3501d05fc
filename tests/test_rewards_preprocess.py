"""The torch preprocessing of each reward against its reference pixel pipeline, on the same image.

References (written from the reward packages' code; ``python tests/test_rewards_preprocess.py``
prints the gap table quoted in the README):
  * PickScore, CLIPScore: transformers' ``CLIPImageProcessor`` (its PIL backend, run here as is);
  * ImageReward, aesthetic: torchvision ``Resize(224, BICUBIC)`` + ``CenterCrop`` on the PIL image
    (ImageReward's BLIP transform, OpenAI CLIP's preprocess): PIL bicubic, offset ``round``;
  * HPSv2: hpsv2's ``image_transform(resize_longest_max=True)``: ``ToTensor`` first, then
    torchvision's float-tensor ``resize`` (bicubic, antialias, no clamp) and a zero pad; the reference
    resizes with PIL on float32 ("F") images, the kernel torchvision's antialiased bicubic follows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _preprocess_images import textured_image
from diffusers_am.rewards.clip_preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipPreprocess,
    center_crop,
    pad_to_square,
    resize_longest_side,
    resize_shortest_side,
)

MEAN_ABS_TOL = 2e-3  # mean |ours - reference| in [0, 1] units (measured <= 1.1e-3: the references round to uint8)
MAX_ABS_TOL = 2.5e-2  # worst pixel (measured <= 1.6e-2 here, at hard edges)
SIZES = [(200, 300), (200, 303), (303, 200), (130, 200), (701, 1000)]
"""(H, W): enlarging (short side < 224) and shrinking; 303 px gives an odd crop excess (offset rounding)."""


def _pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _tensor(pil: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil).astype(np.float32) / 255).permute(2, 0, 1)[None]


def transformers_pixels(img: torch.Tensor, size: int = 224) -> torch.Tensor:
    """PickScore / CLIPScore: transformers' CLIPImageProcessor (PIL backend), before normalizing."""
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 do_normalize=False)
    return torch.from_numpy(proc(_pil(img), return_tensors="np")["pixel_values"])


def torchvision_pil_pixels(img: torch.Tensor, size: int = 224) -> torch.Tensor:
    """ImageReward / aesthetic: torchvision Resize(size, BICUBIC) + CenterCrop(size) + ToTensor on PIL."""
    pil = _pil(img)
    w, h = pil.size
    short, long = min(w, h), max(w, h)
    new_w, new_h = (size, int(size * long / short)) if w <= h else (int(size * long / short), size)
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return _tensor(pil.crop((left, top, left + size, top + size)))


def hpsv2_pixels(img: torch.Tensor, size: int = 224) -> torch.Tensor:
    """HPSv2: hpsv2's ResizeMaxSize on the float tensor (torchvision's float resize: PIL's antialiased bicubic
    kernel, no clamp), here PIL itself on each channel as a 32-bit float image (mode "F": no uint8 rounding, no
    clamp), then F.pad(left=pad_w//2, top=pad_h//2, rest) with 0."""
    h, w = img.shape[-2:]
    scale = size / float(max(h, w))
    new_h, new_w = round(h * scale), round(w * scale)
    channels = [Image.fromarray(c.numpy().astype(np.float32)).resize((new_w, new_h), Image.BICUBIC) for c in img[0]]
    out = torch.from_numpy(np.stack([np.array(c, dtype=np.float32) for c in channels]))[None]
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(out, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


RULES = {  # reward -> (our preprocessing as its loader builds it, the reference pixels)
    "pickscore/clipscore": (ClipPreprocess(rule="shortest", crop="floor"), transformers_pixels),
    "imagereward/aesthetic": (ClipPreprocess(rule="shortest", crop="round"), torchvision_pil_pixels),
    "hpsv2": (ClipPreprocess(rule="longest", clamp=False), hpsv2_pixels),
}


def gap(reward: str, h: int, w: int) -> tuple[float, float]:
    """(mean, max) |ours - reference| on the fixed textured image of h x w."""
    ours, reference = RULES[reward]
    img = textured_image(h, w, seed=h + w)
    diff = (ours.pixels(img) - reference(img)).abs()
    return float(diff.mean()), float(diff.max())


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("reward", sorted(RULES))
def test_preprocessing_matches_the_reference_pixels(reward, h, w):
    mean, worst = gap(reward, h, w)
    assert mean < MEAN_ABS_TOL and worst < MAX_ABS_TOL, (reward, h, w, mean, worst)


def test_hpsv2_keeps_the_bicubic_overshoot_and_pads_black():
    img = textured_image(130, 200, seed=1)  # enlarged: the hard edges overshoot [0, 1]
    ours = ClipPreprocess(rule="longest", clamp=False).pixels(img)
    assert ours.max() > 1.0 or ours.min() < 0.0  # no clamp, as hpsv2
    torch.testing.assert_close(ours, hpsv2_pixels(img), rtol=0, atol=2e-5)  # PIL in float32: measured 3e-6
    pad_h = 224 - round(130 * 224 / 200)
    assert ours[..., : pad_h // 2, :].abs().max() == 0 and ours[..., 224 - (pad_h - pad_h // 2):, :].abs().max() == 0
    clamped = ClipPreprocess(rule="longest").pixels(img)  # the PIL-like rule clamps
    assert clamped.max() <= 1.0 and clamped.min() >= 0.0


def test_crop_offset_rounding_follows_the_reference():
    img = torch.arange(339.0).view(1, 1, 1, 339).expand(1, 3, 224, 339)  # excess 115: 57 (floor) vs 58 (round)
    assert center_crop(img, 224, "floor")[0, 0, 0, 0] == 57 and center_crop(img, 224, "round")[0, 0, 0, 0] == 58
    with pytest.raises(ValueError, match="rounding"):
        center_crop(img, 224, "ceil")


@pytest.mark.parametrize("rule,h,w", [("shortest", 5, 7), ("shortest", 30, 20), ("longest", 5, 7), ("longest", 30, 20)])
def test_gradient_flows_when_enlarging_and_shrinking(rule, h, w):
    """Backward through the antialiased bicubic resize, up (5x7 -> 12) and down (30x20 -> 12), in fp64."""
    img = (0.2 + 0.6 * torch.rand(1, 3, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    if rule == "shortest":
        fn = lambda x: center_crop(resize_shortest_side(x, 12, clamp=False), 12)  # noqa: E731
    else:
        fn = lambda x: pad_to_square(resize_longest_side(x, 12, clamp=False), 12)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (img.requires_grad_(True),))
    big = textured_image(200, 300, seed=0).requires_grad_(True)  # the real-size enlarging path, fp32
    ClipPreprocess(rule=rule)(big).square().sum().backward()
    assert torch.isfinite(big.grad).all() and big.grad.abs().sum() > 0


def test_full_preprocess_grey_normalized_and_differentiable():
    img = textured_image(40, 60, seed=3)[:, :1].requires_grad_(True)
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
    with pytest.raises(ValueError, match="crop"):
        ClipPreprocess(crop="ceil")
    with pytest.raises(ValueError, match=r"\[B, 1 or 3, H, W\]"):
        ClipPreprocess()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="smaller than the crop"):
        center_crop(torch.rand(1, 3, 8, 8), 16)


if __name__ == "__main__":  # the README's gap table
    for name in sorted(RULES):
        for h, w in SIZES:
            direction = "enlarge" if (min(h, w) if name != "hpsv2" else max(h, w)) < 224 else "shrink"
            mean, worst = gap(name, h, w)
            print(f"{name:22s} {f'{w}x{h}':9s} {direction:8s} mean {mean:.2e}  max {worst:.2e}")
