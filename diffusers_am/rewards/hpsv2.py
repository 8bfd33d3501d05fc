"""HPSv2 / HPSv2.1 (Wu et al., 2023): cosine of the normalized image and prompt embeddings of an
open_clip ViT-H-14 fine-tuned on human preferences (values about 0.2-0.35).

Checkpoints: ``xswu/HPSv2`` -> ``HPS_v2_compressed.pt`` (v2.0) and ``HPS_v2.1_compressed.pt``
(v2.1), open_clip state dicts (``{'state_dict': ...}``) converted here into a transformers
``CLIPModel`` (no open_clip, no torchvision, no LAION download). Tokenizer: the OpenAI CLIP BPE,
from ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Preprocessing (hpsv2's
``image_transform(resize_longest_max=True)``): ``ToTensor`` first, then longest side to 224 bicubic
on the float tensor (antialiased, no clamp to [0, 1]), zero pad to square, OpenAI mean/std.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import UserError
from ..checks import one_of
from .checkpoints import load_strict, place, resolve_file, skip_init, torch_load, unwrap_state_dict
from .clip import ClipEmbedder, load_clip_tokenizer
from ._open_clip import VIT_H_14, clip_config_from_open_clip, convert_open_clip_state_dict
from .clip_preprocess import ClipPreprocess

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_TOKENIZER_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class HPSv2(torch.nn.Module):
    """(images [B, C, H, W] in [0, 1], prompts: list[str] of length B) -> [B] fp32 cosine."""

    def __init__(self, embedder: ClipEmbedder, version: str):
        super().__init__()
        self.embedder = embedder
        self.version = version

    def forward(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        return self.embedder.cosine(images, prompts)


def _model_config(model_config: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    if model_config is None:
        return dict(VIT_H_14)
    if isinstance(model_config, Mapping):
        cfg = dict(model_config)
    else:
        file = Path(model_config)
        if not file.is_file():
            raise UserError(f"`model_config` {str(file)!r} is not a file: pass an open_clip model config JSON or a dict.")
        cfg = json.loads(file.read_text())
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise UserError(f"`model_config` lacks {missing}: use open_clip's JSON layout (embed_dim, vision_cfg, text_cfg).")
    return cfg


def load_hpsv2(
    path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    version: str = "v2.0",
    tokenizer_path: str | os.PathLike | None = None,
    model_config: Mapping[str, Any] | str | os.PathLike | None = None,
) -> HPSv2:
    """HPSv2 from the checkpoint file, a folder holding it, or a Hub id (default ``xswu/HPSv2``).

    ``version``: "v2.0" or "v2.1" (picks the file name inside a folder or repo).
    ``tokenizer_path``: CLIP BPE tokenizer folder or Hub id (default: ``path`` when it is a folder
    with tokenizer files, else ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
    ``model_config``: open_clip model config (dict or JSON file); default ViT-H-14."""
    one_of(version, "version", sorted(HPS_FILES))
    cfg = _model_config(model_config)
    file = resolve_file(path, default_repo=HPS_REPO, filename=HPS_FILES[version])
    state = unwrap_state_dict(torch_load(file), file)
    from transformers import CLIPModel

    converted = convert_open_clip_state_dict(state, cfg, source=repr(str(file)))  # key check before building
    with skip_init():  # ViT-H: skip the random init the checkpoint overwrites
        model = CLIPModel(clip_config_from_open_clip(cfg))
    load_strict(model, converted, source=repr(str(file)))
    if tokenizer_path is None:
        folder = file.parent
        has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json"))
        tokenizer_path = str(folder) if has_tok and path is not None and Path(str(path)).exists() else HPS_TOKENIZER_REPO
    tokenizer = load_clip_tokenizer(str(tokenizer_path))
    # hpsv2's transform: ToTensor, then torchvision's resize of the float tensor (no clamp), zero pad
    preprocess = ClipPreprocess(size=cfg["vision_cfg"]["image_size"], rule="longest", clamp=False)
    embedder = ClipEmbedder(model, tokenizer, preprocess, max_length=cfg["text_cfg"].get("context_length", 77))
    return place(HPSv2(embedder, version), device, dtype)


def load_hpsv21(
    path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> HPSv2:
    """HPSv2.1 (``HPS_v2.1_compressed.pt``); see :func:`load_hpsv2`."""
    return load_hpsv2(path, device, dtype, version="v2.1", **kwargs)
