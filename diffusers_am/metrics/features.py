"""Pluggable image feature extractors for Recall / Coverage and the feature diversity.

A feature extractor is any callable ``images [B, C, H, W] in [0, 1] -> [B, F]``.
:func:`load_feature_extractor` builds one from a spec:
  * ``"clip"`` (default): CLIP ViT-L/14 image embeddings (``openai/clip-vit-large-patch14``,
    transformers), L2-normalized; ``"clip:<folder or Hub id>"`` picks another CLIP;
  * ``"digits"`` / ``"digits-heldout"`` (``"shapes"`` / ``"shapes-heldout"``): the digits (shapes)
    classifiers' penultimate features;
  * ``"module:callable"`` or ``"file.py:callable"``: your own (a callable, or a factory of one
    when it is a class).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from ..errors import UserError

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


class ClipImageFeatures(torch.nn.Module):
    """[B, C, H, W] in [0, 1] -> [B, D] unit-norm CLIP image embeddings (fp32)."""

    def __init__(self, path: str | os.PathLike = DEFAULT_CLIP, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        from ..rewards.clip import build_clip_embedder

        self.embedder = build_clip_embedder(str(path), device=device, dtype=dtype, need_tokenizer=False, argument="feature_extractor")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder.image_embeds(images)


def load_feature_extractor(
    spec: str | FeatureExtractor | None = "clip", device: torch.device | str | None = None
) -> FeatureExtractor:
    """A feature extractor from ``spec`` (see the module docstring); a callable passes through."""
    if spec is None:
        spec = "clip"
    if callable(spec):
        return spec
    spec = spec.strip()
    if spec == "clip" or spec.startswith("clip:"):
        return ClipImageFeatures(spec.split(":", 1)[1] if ":" in spec else DEFAULT_CLIP, device=device)
    if spec in ("digits", "digits-heldout", "shapes", "shapes-heldout"):
        from ..rewards import load_reward

        return load_reward(spec, device=device).features
    if ":" in spec:
        from ..rewards import _user_callable

        target = _user_callable(spec)
        return target() if isinstance(target, type) else target
    raise UserError(
        f"unknown feature extractor {spec!r}; use 'clip', 'clip:<folder or Hub id>', 'digits', 'digits-heldout' "
        "or 'module:callable' (a callable images [B, C, H, W] -> [B, F])."
    )


@torch.no_grad()
def extract_features(features: FeatureExtractor, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """[N, F] fp32 features of ``images`` [N, C, H, W], computed in batches without autograd."""
    out = [features(images[s : s + batch_size]).float().flatten(1) for s in range(0, images.shape[0], batch_size)]
    return torch.cat(out)
