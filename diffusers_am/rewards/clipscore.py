"""CLIPScore (Hessel et al., 2021), torchmetrics' convention: ``max(100 * cos(image, prompt), 0)``.

Default checkpoint ``openai/clip-vit-large-patch14`` (ViT-L/14; ``openai/clip-vit-base-patch32``
also works); any transformers CLIP folder or Hub id. Preprocessing (its ``CLIPImageProcessor``):
shortest side to the model's image size bicubic, center crop (offset rounded down), the model's
mean/std. Gradients vanish where the score is clamped at 0.

Prompts: CLIP's text encoder has 77 positions. A longer prompt (over 75 BPE tokens plus the start
and end tokens) is truncated without error or warning to its first 75 tokens, the end token kept
(the tokenizer's ``truncation=True``): words past that point do not change the score
(tests/test_rewards_clip.py::test_clipscore_truncates_prompts_over_77_tokens).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .clip import ClipEmbedder, build_clip_embedder

CLIPSCORE_REPO = "openai/clip-vit-large-patch14"


class CLIPScore(torch.nn.Module):
    """(images [B, C, H, W] in [0, 1], prompts: list[str] of length B) -> [B] fp32 in [0, 100]."""

    def __init__(self, embedder: ClipEmbedder, weight: float = 100.0):
        super().__init__()
        self.embedder = embedder
        self.weight = weight

    def forward(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        return (self.weight * self.embedder.cosine(images, prompts)).clamp_min(0.0)


def load_clipscore(
    path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer_path: str | os.PathLike | None = None,
) -> CLIPScore:
    """CLIPScore on a local transformers CLIP folder or Hub id (default ``openai/clip-vit-large-patch14``);
    prompts over 77 tokens are truncated (see the module docstring)."""
    source = CLIPSCORE_REPO if path is None else str(path)
    return CLIPScore(build_clip_embedder(source, tokenizer_path=tokenizer_path, device=device, dtype=dtype))
