"""A frozen transformers CLIP model as a differentiable embedder of images and prompts.

Shared by PickScore, CLIPScore, the aesthetic predictor, HPSv2 and the CLIP feature extractor.
Embeddings are L2-normalized fp32 [B, D]; gradients flow to the images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import UserError
from .base import check_images
from .checkpoints import check_prompts, looks_like_repo_id, place
from .clip_preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocess


def _processor_stats(source: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """image_mean / image_std from a local ``preprocessor_config.json`` (OpenAI's otherwise)."""
    file = Path(source) / "preprocessor_config.json"
    if not file.is_file() and looks_like_repo_id(source) and not Path(source).exists():
        try:
            from huggingface_hub import hf_hub_download

            file = Path(hf_hub_download(source, "preprocessor_config.json"))
        except Exception:  # offline or no processor file: the OpenAI statistics every CLIP here uses
            return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    if not file.is_file():
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    cfg = json.loads(file.read_text())
    return tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)), tuple(cfg.get("image_std", OPENAI_CLIP_STD))


def load_clip_model(path: str, *, dtype: torch.dtype | None = None, argument: str = "path") -> Any:
    """``CLIPModel.from_pretrained`` with a ValueError saying how to work offline."""
    from transformers import CLIPModel

    if not looks_like_repo_id(path) and not Path(path).expanduser().exists():
        raise UserError(f"`{argument}` {path!r} does not exist: pass a local CLIP folder or a Hub repo id.")
    try:
        return CLIPModel.from_pretrained(path, dtype=dtype or torch.float32)
    except Exception as err:
        raise UserError(
            f"`{argument}` {path!r}: cannot load a transformers CLIPModel ({type(err).__name__}: {err}). "
            "Pass a local folder written by `CLIPModel.save_pretrained` (or downloaded with "
            "`hf download <repo> --local-dir <folder>`)."
        ) from err


def load_clip_tokenizer(path: str, *, argument: str = "tokenizer_path") -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise UserError(
            f"`{argument}` {path!r}: cannot load the CLIP tokenizer ({type(err).__name__}: {err}). "
            "Pass a local folder with tokenizer.json (or vocab.json + merges.txt)."
        ) from err


class ClipEmbedder(torch.nn.Module):
    """Normalized CLIP image / text embeddings.

    Args:
        model: a transformers ``CLIPModel`` (frozen here).
        tokenizer: its tokenizer; prompts are padded/truncated to ``max_length`` tokens.
        preprocess: the model's resize rule and normalization.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, preprocess: ClipPreprocess, max_length: int = 77):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.max_length = min(max_length, model.config.text_config.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.logit_scale.dtype

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] in [0, 1] -> [B, D] unit-norm fp32."""
        pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        emb = self.model.get_image_features(pixel_values=pixels)
        emb = getattr(emb, "pooler_output", emb).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """prompts (B strings) -> [B, D] unit-norm fp32; a prompt over ``max_length`` tokens is cut to
        its first ``max_length - 2`` (start and end tokens kept), silently."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        emb = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        emb = getattr(emb, "pooler_output", emb).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def cosine(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        """[B] cosine between each image and its own prompt (inputs validated)."""
        check_images(images, channels=(1, 3))
        prompts = check_prompts(images, prompts)
        return (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)


def build_clip_embedder(
    path: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    rule: str = "shortest",
    crop: str = "floor",
    argument: str = "path",
    need_tokenizer: bool = True,
) -> ClipEmbedder:
    """A frozen ClipEmbedder from a transformers CLIP folder or Hub id (tokenizer from
    ``tokenizer_path``, default the same place); ``rule`` and ``crop`` as in :class:`ClipPreprocess`."""
    path = str(path)
    model = load_clip_model(path, dtype=dtype, argument=argument)
    tok_source = str(tokenizer_path) if tokenizer_path is not None else path
    tokenizer = load_clip_tokenizer(tok_source) if need_tokenizer else None
    mean, std = _processor_stats(tok_source if tokenizer_path is not None else path)
    preprocess = ClipPreprocess(size=model.config.vision_config.image_size, rule=rule, mean=mean, std=std, crop=crop)
    return place(ClipEmbedder(model, tokenizer, preprocess), device, dtype)
