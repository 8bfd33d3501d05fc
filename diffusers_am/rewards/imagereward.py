"""ImageReward (Xu et al., 2023) for transformers 5, on its original checkpoint.

Architecture (the checkpoint's): BLIP ViT-L/16 image encoder (224 px) -> BERT text encoder with
cross-attention to the image tokens (``med_config.json``; transformers' ``BlipTextModel``, which
keeps BLIP's ``med.py`` layout) -> the text's first token -> MLP 768-1024-128-64-16-1 without
activations -> ``(r - 0.16717362830052426) / 1.0333394966054072``. Prompts: BERT uncased
WordPiece with BLIP's two extra tokens (``[DEC]``, ``[ENC]``; vocab 30524), padded to 35 tokens.
Preprocessing (its BLIP transform: torchvision ``Resize(224, BICUBIC)`` and ``CenterCrop`` on the PIL
image): shortest side to 224 bicubic, center crop (torchvision's offset rounding), OpenAI mean/std.

Files: ``THUDM/ImageReward`` -> ``ImageReward.pt`` (state dict) and ``med_config.json``; the
tokenizer from ``google-bert/bert-base-uncased`` (or a folder with ``vocab.txt``). The state dict
loads strictly: any missing or unexpected key is named in a ValueError (the one tolerated extra
is the old BERT ``position_ids`` buffer, which holds no weights).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import UserError
from .checkpoints import check_keys, check_prompts, load_strict, place, skip_init, resolve_file, torch_load, unwrap_state_dict
from .aesthetic import AestheticMLP
from .base import check_images
from .clip_preprocess import ClipPreprocess

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
BERT_TOKENIZER_REPO = "google-bert/bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35
_IGNORED_KEYS = ("blip.text_encoder.embeddings.position_ids",)
_VIT_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _checkpoint_to_module_key(key: str) -> str:
    """``ImageReward.pt`` key -> :class:`ImageRewardModel` key (unknown keys pass through unchanged)."""
    v = "blip.visual_encoder."
    if key.startswith(v):
        rest = key[len(v):]
        simple = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding"}
        if rest in simple:
            return "vision." + simple[rest]
        if rest.startswith("patch_embed.proj."):
            return "vision.embeddings.patch_embedding." + rest.split(".")[-1]
        if rest.startswith("norm."):
            return "vision.post_layernorm." + rest.split(".")[-1]
        if rest.startswith("blocks."):
            _, idx, *tail = rest.split(".")
            inner, param = ".".join(tail[:-1]), tail[-1]
            return f"vision.encoder.layers.{idx}.{_VIT_BLOCK.get(inner, inner)}.{param}"
        return key
    for src, dst in (("blip.text_encoder.", "text."), ("blip.vision_proj.", "vision_proj."), ("blip.text_proj.", "text_proj.")):
        if key.startswith(src):
            return dst + key[len(src):]
    return key


def _module_to_checkpoint_key(key: str) -> str:
    """Inverse of :func:`_checkpoint_to_module_key` (to name missing keys as the file spells them)."""
    v = "blip.visual_encoder."
    simple = {"vision.embeddings.class_embedding": v + "cls_token", "vision.embeddings.position_embedding": v + "pos_embed"}
    if key in simple:
        return simple[key]
    if key.startswith("vision.embeddings.patch_embedding."):
        return v + "patch_embed.proj." + key.split(".")[-1]
    if key.startswith("vision.post_layernorm."):
        return v + "norm." + key.split(".")[-1]
    if key.startswith("vision.encoder.layers."):
        _, _, _, idx, *tail = key.split(".")
        inner, param = ".".join(tail[:-1]), tail[-1]
        inverse = {dst: src for src, dst in _VIT_BLOCK.items()}
        return f"{v}blocks.{idx}.{inverse.get(inner, inner)}.{param}"
    for src, dst in (("text.", "blip.text_encoder."), ("vision_proj.", "blip.vision_proj."), ("text_proj.", "blip.text_proj.")):
        if key.startswith(src):
            return dst + key[len(src):]
    return key


class ImageRewardModel(nn.Module):
    """BLIP ViT + cross-attention BERT + MLP head; ``score(pixels, ids, mask) -> [B]`` normalized."""

    def __init__(self, text_config: Any, vision_config: Any, embed_dim: int = 256):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        # BLIP's contrastive projections: in the checkpoint, unused by the reward
        self.vision_proj = nn.Linear(vision_config.hidden_size, embed_dim)
        self.text_proj = nn.Linear(text_config.hidden_size, embed_dim)
        self.mlp = AestheticMLP(text_config.hidden_size)

    def score(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        text = self.text(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
            encoder_attention_mask=image_mask, is_decoder=False,
        ).last_hidden_state
        raw = self.mlp(text[:, 0, :])
        return (raw - REWARD_MEAN) / REWARD_STD


class ImageReward(nn.Module):
    """(images [B, C, H, W] in [0, 1], prompts: list[str] of length B) -> [B] fp32."""

    def __init__(self, model: ImageRewardModel, tokenizer: Any, preprocess: ClipPreprocess):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        check_images(images, channels=(1, 3))
        prompts = check_prompts(images, prompts)
        param = self.model.mlp.layers[0].weight
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt").to(param.device)
        pixels = self.preprocess(images.to(param.device)).to(param.dtype)
        return self.model.score(pixels, tokens.input_ids, tokens.attention_mask).float()


def text_config_from_med(med: Mapping[str, Any], encoder_width: int) -> Any:
    """BLIP's ``med_config.json`` (a BertConfig) -> ``BlipTextConfig`` with cross-attention."""
    from transformers import BlipTextConfig

    needed = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
    missing = [k for k in needed if k not in med]
    if missing:
        raise UserError(f"`med_config.json` lacks {missing}: is it ImageReward's BERT config?")
    return BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med.get("max_position_embeddings", 512),
        hidden_act=med.get("hidden_act", "gelu"), layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        pad_token_id=med.get("pad_token_id", 0), bos_token_id=med.get("bos_token_id"), eos_token_id=med.get("eos_token_id"),
        sep_token_id=med.get("sep_token_id"), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True,
    )


def vision_config_from_state(state: Mapping[str, torch.Tensor], num_heads: int | None, *, source: str) -> Any:
    """BLIP ViT geometry read off the checkpoint (width, depth, patch, image size); heads: 16 for
    width 1024 (ViT-L), 12 for 768 (ViT-B), else ``num_heads``."""
    from transformers import BlipVisionConfig

    try:
        cls = state["blip.visual_encoder.cls_token"]
        patch = state["blip.visual_encoder.patch_embed.proj.weight"]
        pos = state["blip.visual_encoder.pos_embed"]
        mlp = state["blip.visual_encoder.blocks.0.mlp.fc1.weight"]
    except KeyError as err:
        raise UserError(f"checkpoint {source} lacks the BLIP image encoder key {err.args[0]!r}: is it ImageReward.pt?") from err
    width = cls.shape[-1]
    depth = len({k.split(".")[3] for k in state if k.startswith("blip.visual_encoder.blocks.")})
    heads = num_heads or {1024: 16, 768: 12}.get(width)
    if heads is None or width % heads:
        raise UserError(f"checkpoint {source}: cannot infer the ViT head count for width {width}; pass `vision_heads`.")
    grid = math.isqrt(pos.shape[1] - 1)
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=mlp.shape[0], num_hidden_layers=depth, num_attention_heads=heads,
        image_size=grid * patch.shape[-1], patch_size=patch.shape[-1], layer_norm_eps=1e-6, hidden_act="gelu",
    )


def load_blip_tokenizer(source: str) -> Any:
    """BERT uncased WordPiece + ``[DEC]`` (bos) + ``[ENC]``, as BLIP's ``init_tokenizer``."""
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(source)
    except Exception as err:
        raise UserError(
            f"`tokenizer_path` {source!r}: cannot load the BERT tokenizer ({type(err).__name__}: {err}). "
            "Pass a local folder with vocab.txt (bert-base-uncased's)."
        ) from err
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def load_imagereward(
    path: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    med_config: str | os.PathLike | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    vision_heads: int | None = None,
) -> ImageReward:
    """ImageReward from ``ImageReward.pt`` (the file, a folder holding it and ``med_config.json``,
    or a Hub id; default ``THUDM/ImageReward``). ``med_config``: the BERT config file (default:
    beside the checkpoint / in the same repo). ``tokenizer_path``: a folder with ``vocab.txt``
    (default: the checkpoint's folder when it has one, else ``google-bert/bert-base-uncased``)."""
    file = resolve_file(path, default_repo=IMAGEREWARD_REPO, filename=IMAGEREWARD_FILE)
    if med_config is None:
        local_med = file.parent / MED_CONFIG_FILE
        med_file = local_med if local_med.is_file() else resolve_file(path, default_repo=IMAGEREWARD_REPO, filename=MED_CONFIG_FILE, argument="med_config")
    else:
        med_file = resolve_file(med_config, default_repo=IMAGEREWARD_REPO, filename=MED_CONFIG_FILE, argument="med_config")
    med = json.loads(Path(med_file).read_text())
    source = repr(str(file))
    state = unwrap_state_dict(torch_load(file), file)
    state = {k: v for k, v in state.items() if k not in _IGNORED_KEYS}
    vision_cfg = vision_config_from_state(state, vision_heads, source=source)
    text_cfg = text_config_from_med(med, encoder_width=vision_cfg.hidden_size)
    embed_dim = state["blip.vision_proj.weight"].shape[0] if "blip.vision_proj.weight" in state else 256
    with skip_init():  # every tensor comes from the checkpoint (checked below)
        model = ImageRewardModel(text_cfg, vision_cfg, embed_dim)
    check_keys({_module_to_checkpoint_key(k) for k in model.state_dict()}, state.keys(), source=source)
    load_strict(model, {_checkpoint_to_module_key(k): v for k, v in state.items()}, source=source)
    if tokenizer_path is None:
        tokenizer_path = file.parent if (file.parent / "vocab.txt").is_file() else BERT_TOKENIZER_REPO
    tokenizer = load_blip_tokenizer(str(tokenizer_path))
    if len(tokenizer) > text_cfg.vocab_size:
        raise UserError(f"tokenizer {str(tokenizer_path)!r} has {len(tokenizer)} tokens but the text encoder only {text_cfg.vocab_size}.")
    # BLIP's transform: torchvision Resize + CenterCrop on the PIL image (crop offset rounded to nearest)
    preprocess = ClipPreprocess(size=vision_cfg.image_size, rule="shortest", crop="round")
    return place(ImageReward(model, tokenizer, preprocess), device, dtype)
