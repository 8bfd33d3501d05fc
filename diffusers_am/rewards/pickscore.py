"""PickScore (Kirstain et al., 2023): ``logit_scale.exp() * cos(image, prompt)`` of a CLIP ViT-H/14
fine-tuned on Pick-a-Pic. Typical values 18-23.

Checkpoint: ``yuvalkirstain/PickScore_v1`` (a transformers CLIP folder); its tokenizer and image
statistics come from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Preprocessing (its
``CLIPImageProcessor``): shortest side to 224 bicubic, center crop (offset rounded down), OpenAI
mean/std; prompts 77 tokens (longer ones truncated, as in ``CLIPScore``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .clip import ClipEmbedder, build_clip_embedder

PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScore(torch.nn.Module):
    """(images [B, C, H, W] in [0, 1], prompts: list[str] of length B) -> [B] fp32."""

    def __init__(self, embedder: ClipEmbedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        scale = self.embedder.model.logit_scale.float().exp()
        return scale * self.embedder.cosine(images, prompts)


def load_pickscore(
    path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer_path: str | os.PathLike | None = None,
) -> PickScore:
    """PickScore from a local CLIP folder or a Hub id (default ``yuvalkirstain/PickScore_v1``).

    ``tokenizer_path``: where the tokenizer lives; default: ``path`` itself when it is a local
    folder holding tokenizer files, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``."""
    source = PICKSCORE_REPO if path is None else str(path)
    if tokenizer_path is None:
        has_tok = os.path.isdir(source) and any(
            os.path.isfile(os.path.join(source, f)) for f in ("tokenizer.json", "vocab.json")
        )
        tokenizer_path = source if has_tok else PICKSCORE_PROCESSOR_REPO
    return PickScore(build_clip_embedder(source, tokenizer_path=tokenizer_path, device=device, dtype=dtype))
