"""LAION aesthetic predictor v2 ("improved aesthetic predictor"): a linear MLP on the L2-normalized
CLIP ViT-L/14 image embedding, trained on SAC + LAION-logos + AVA ratings (scores about 1-10).

Files: the MLP ``sac+logos+ava1-l14-linearMSE.pth`` (a state dict with keys ``layers.{0,2,4,6,7}``;
on the Hub in ``camenduru/improved-aesthetic-predictor``) and the CLIP ``openai/clip-vit-large-patch14``.
Preprocessing (OpenAI ``clip.load``'s, as the predictor's inference script): shortest side to 224
bicubic, center crop (torchvision's offset rounding), OpenAI mean/std. Prompts are not used
(their count is still checked).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn

from .checkpoints import check_prompts, load_strict, place, resolve_file, torch_load, unwrap_state_dict
from .clip import ClipEmbedder, build_clip_embedder
from .base import check_images

AESTHETIC_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_CLIP_REPO = "openai/clip-vit-large-patch14"


class AestheticMLP(nn.Module):
    """[B, D] -> [B]: Linear(D,1024), Dropout(.2), Linear(1024,128), Dropout(.2), Linear(128,64),
    Dropout(.1), Linear(64,16), Linear(16,1) — no activations, as trained."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


class AestheticScore(nn.Module):
    """(images [B, C, H, W] in [0, 1], prompts of length B, unused) -> [B] fp32."""

    def __init__(self, embedder: ClipEmbedder, mlp: AestheticMLP):
        super().__init__()
        self.embedder = embedder
        self.mlp = mlp

    def forward(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        check_images(images, channels=(1, 3))
        check_prompts(images, prompts)
        emb = self.embedder.image_embeds(images)
        return self.mlp(emb.to(self.mlp.layers[0].weight.dtype)).float()


def load_aesthetic(
    path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    clip_path: str | os.PathLike | None = None,
) -> AestheticScore:
    """The aesthetic predictor: ``path`` is the MLP file, a folder holding it, or a Hub id (default
    ``camenduru/improved-aesthetic-predictor``); ``clip_path`` the CLIP ViT-L/14 folder or Hub id."""
    file = resolve_file(path, default_repo=AESTHETIC_REPO, filename=AESTHETIC_FILE)
    state = unwrap_state_dict(torch_load(file), file)
    embedder = build_clip_embedder(
        AESTHETIC_CLIP_REPO if clip_path is None else str(clip_path), argument="clip_path", need_tokenizer=False,
        crop="round",  # the predictor embeds with OpenAI CLIP's preprocess: torchvision Resize + CenterCrop on PIL
    )
    width = embedder.model.config.projection_dim
    mlp = AestheticMLP(width)
    load_strict(mlp, state, source=repr(str(file)))
    return place(AestheticScore(embedder, mlp), device, dtype)
