"""Within-prompt diversity: the mean pairwise distance between the images of one prompt (or class),
averaged over prompts. Higher = more diverse; a collapse toward one image per prompt (reward
hacking's usual face) shows as a drop.

A diversity metric is a pair distance ``d(x [P, C, H, W], y [P, C, H, W]) -> [P]`` on images in
[0, 1]. Built in (:func:`get_diversity_metric`):
  * ``"lpips"``: LPIPS-AlexNet (needs the weight files, :mod:`.lpips`; images >= 64 px);
  * ``"ms_ssim"``: 1 - MS-SSIM (pytorch-msssim, 5 scales, 11 px Gaussian window; images > 160 px);
  * ``"ssim"``: 1 - SSIM (pytorch-msssim; the window shrinks to fit small images, e.g. 3 px on 8x8);
  * ``"feature_distance"``: 1 - cosine between feature vectors of any feature extractor.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import UserError
from ..rewards.base import check_images

PairDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DIVERSITY_METRICS = ("lpips", "ms_ssim", "ssim", "feature_distance")


def one_minus_ms_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[P] 1 - MS-SSIM (pytorch-msssim 1.0, data range 1, 5 scales); needs min side > 160 px."""
    from pytorch_msssim import ms_ssim

    if min(x.shape[-2:]) <= 160:
        raise UserError(
            f"1 - MS-SSIM needs images larger than 160 px (5 scales of an 11 px window); got {tuple(x.shape[-2:])}. "
            "Use the 'ssim' diversity metric for small images."
        )
    return 1.0 - ms_ssim(x.float(), y.float(), data_range=1.0, size_average=False)


def ssim_window(height: int, width: int) -> int:
    """The Gaussian window for SSIM: 11 px, or the largest odd size that fits a small image."""
    side = min(height, width, 11)
    return max(side if side % 2 else side - 1, 1)


def one_minus_ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[P] 1 - SSIM (pytorch-msssim, data range 1, window :func:`ssim_window`)."""
    from pytorch_msssim import ssim

    win = ssim_window(*x.shape[-2:])
    return 1.0 - ssim(x.float(), y.float(), data_range=1.0, size_average=False, win_size=win)


class FeatureDistance:
    """[P] 1 - cos(features(x), features(y)) for a feature extractor ``images -> [B, F]``."""

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor]):
        self.features = features

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self.features(x).float().flatten(1), self.features(y).float().flatten(1)
        return (1.0 - torch.nn.functional.cosine_similarity(fx, fy, dim=-1)).clamp_min(0.0)


def get_diversity_metric(name: str, *, features: Callable | None = None, lpips_kwargs: dict | None = None) -> PairDistance:
    """A pair distance by name (see the module docstring)."""
    if name == "lpips":
        from .lpips import load_lpips

        return load_lpips(**(lpips_kwargs or {}))
    if name == "ms_ssim":
        return one_minus_ms_ssim
    if name == "ssim":
        return one_minus_ssim
    if name == "feature_distance":
        if features is None:
            raise UserError("diversity metric 'feature_distance' needs `features` (a callable images -> [B, F]).")
        return FeatureDistance(features)
    raise UserError(f"unknown diversity metric {name!r}; known: {', '.join(DIVERSITY_METRICS)}.")


def default_diversity_metrics(image_size: int, features: bool = True) -> tuple[str, ...]:
    """The one default rule (validation and evaluation): LPIPS and 1 - MS-SSIM (the paper's) on images
    above 160 px; on small images (e.g. the 8x8 digits) 1 - SSIM, plus the feature distance when a
    feature extractor is given."""
    if image_size > 160:
        return ("lpips", "ms_ssim")
    return ("ssim", "feature_distance") if features else ("ssim",)


def resolve_diversity(
    diversity: str | Sequence[str] | Mapping[str, Callable] | None, image_size: int, features: Callable | None
) -> dict[str, Callable]:
    """name -> pair distance. None / "auto": :func:`default_diversity_metrics`; "none" (or an empty
    list): no diversity at all; else a comma-separated string or a list of names."""
    if isinstance(diversity, Mapping):
        return dict(diversity)
    if diversity is None or diversity == "auto":
        names = list(default_diversity_metrics(image_size, features is not None))
    elif isinstance(diversity, str):
        names = [] if diversity.strip() == "none" else [n.strip() for n in diversity.split(",")]
    else:
        names = list(diversity)
    return {n: get_diversity_metric(n, features=features) for n in names if n}


def group_indices(conditions: Sequence[Any]) -> list[list[int]]:
    """Indices of equal conditions (prompts or labels), in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for i, c in enumerate(conditions):
        key = int(c) if isinstance(c, torch.Tensor) else c
        groups.setdefault(key, []).append(i)
    return list(groups.values())


@torch.no_grad()
def within_prompt_diversity(
    images: torch.Tensor, conditions: Sequence[Any], metric: PairDistance, max_pairs_per_batch: int = 64
) -> float:
    """Mean over conditions of the mean pairwise ``metric`` between that condition's images.

    images [N, C, H, W] in [0, 1]; conditions: N prompts or labels (groups of >= 2 needed)."""
    check_images(images)
    if len(conditions) != images.shape[0]:
        raise UserError(f"`conditions` has {len(conditions)} entries for {images.shape[0]} images: pass one per image.")
    per_group = []
    for idx in group_indices(conditions):
        if len(idx) < 2:
            continue
        pairs = [(a, b) for i, a in enumerate(idx) for b in idx[i + 1 :]]
        dists = []
        for s in range(0, len(pairs), max_pairs_per_batch):
            chunk = pairs[s : s + max_pairs_per_batch]
            a = torch.tensor([p[0] for p in chunk], device=images.device)
            b = torch.tensor([p[1] for p in chunk], device=images.device)
            dists.append(metric(images[a], images[b]).float().reshape(-1))
        per_group.append(torch.cat(dists).mean())
    if not per_group:
        raise UserError("within-prompt diversity needs at least 2 images for some prompt; use num_images_per_prompt >= 2.")
    return torch.stack(per_group).mean().item()
