"""Tiny random reward checkpoints written in the real formats (for the offline loader tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 516, "width": 32, "heads": 2, "layers": 2},
}


def _byte_chars() -> list[str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_tokenizer(folder: Path) -> int:
    """A toy byte-level CLIP BPE (516 tokens; <|endoftext|> is the last id). Returns the vocab size."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    raw = folder / "_raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (raw / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    tok = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"))
    tok.save_pretrained(str(folder))
    return len(vocab)


def write_tiny_clip(folder: Path, projection_dim: int = 16, image_size: int = 32) -> Path:
    """A transformers CLIP folder (model + tokenizer + preprocessor stats), as save_pretrained writes it."""
    from transformers import CLIPConfig, CLIPModel

    vocab = write_clip_tokenizer(folder)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=vocab, eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )
    torch.manual_seed(1)
    CLIPModel(cfg).save_pretrained(str(folder))
    return folder


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape) * 0.1


def _norm(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    return 1.0 + 0.1 * torch.randn(width), 0.1 * torch.randn(width)


def open_clip_state_dict(cfg: dict = TINY_OPEN_CLIP) -> dict[str, torch.Tensor]:
    """A random state dict with exactly open_clip 3.x's ViT CLIP keys and shapes."""
    torch.manual_seed(2)
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    sd: dict[str, torch.Tensor] = {}

    def blocks(prefix: str, width: int, layers: int) -> None:
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = _norm(width)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = _rand(3 * width, width), _rand(3 * width)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = _rand(width, width), _rand(width)
            sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = _norm(width)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = _rand(4 * width, width), _rand(4 * width)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = _rand(width, 4 * width), _rand(width)

    w, grid = v["width"], v["image_size"] // v["patch_size"]
    sd["visual.class_embedding"] = _rand(w)
    sd["visual.positional_embedding"] = _rand(grid * grid + 1, w)
    sd["visual.proj"] = _rand(w, e)
    sd["visual.conv1.weight"] = _rand(w, 3, v["patch_size"], v["patch_size"])
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = _norm(w)
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = _norm(w)
    blocks("visual.", w, v["layers"])
    tw = t["width"]
    sd["token_embedding.weight"] = _rand(t["vocab_size"], tw)
    sd["positional_embedding"] = _rand(t["context_length"], tw)
    sd["text_projection"] = _rand(tw, e)
    sd["ln_final.weight"], sd["ln_final.bias"] = _norm(tw)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    blocks("", tw, t["layers"])
    return sd


def write_hps_checkpoint(folder: Path, filename: str = "HPS_v2_compressed.pt", sd: dict | None = None) -> Path:
    """``{'state_dict': ...}`` under HPS's file name, plus the toy tokenizer beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd if sd is not None else open_clip_state_dict()}, folder / filename)
    write_clip_tokenizer(folder)
    return folder / filename


def write_aesthetic_mlp(file: Path, input_size: int = 16) -> Path:
    """The LAION aesthetic MLP state dict (keys layers.{0,2,4,6,7})."""
    torch.manual_seed(3)
    sizes = [(1024, input_size), (128, 1024), (64, 128), (16, 64), (1, 16)]
    sd = {}
    for idx, (o, i) in zip((0, 2, 4, 6, 7), sizes):
        sd[f"layers.{idx}.weight"], sd[f"layers.{idx}.bias"] = _rand(o, i), _rand(o)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, file)
    return file


TINY_MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-12,
    "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2, "num_hidden_layers": 2,
    "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 15, "encoder_width": 32, "add_cross_attention": True,
}
WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "the", "dog", "##s", "!", "red", "photo"]


def imagereward_state_dict(vision_width: int = 24, depth: int = 2, patch: int = 8, image_size: int = 32) -> dict[str, torch.Tensor]:
    """Random tensors under ImageReward.pt's keys (BLIP ViT, med BERT with cross-attention, MLP)."""
    torch.manual_seed(4)
    sd: dict[str, torch.Tensor] = {}
    w, n = vision_width, (image_size // patch) ** 2 + 1
    v = "blip.visual_encoder."
    sd[v + "cls_token"], sd[v + "pos_embed"] = _rand(1, 1, w), _rand(1, n, w)
    sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"] = _rand(w, 3, patch, patch), _rand(w)
    for i in range(depth):
        b = f"{v}blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = _norm(w)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = _rand(3 * w, w), _rand(3 * w)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = _rand(w, w), _rand(w)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = _norm(w)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = _rand(4 * w, w), _rand(4 * w)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = _rand(w, 4 * w), _rand(w)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = _norm(w)
    h, t = TINY_MED["hidden_size"], "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = _rand(TINY_MED["vocab_size"], h)
    sd[t + "embeddings.position_embeddings.weight"] = _rand(TINY_MED["max_position_embeddings"], h)
    sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"] = _norm(h)
    sd[t + "embeddings.position_ids"] = torch.arange(TINY_MED["max_position_embeddings"]).unsqueeze(0)
    for i in range(TINY_MED["num_hidden_layers"]):
        layer = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention.", h), ("crossattention.", w)):
            sd[layer + att + "self.query.weight"], sd[layer + att + "self.query.bias"] = _rand(h, h), _rand(h)
            sd[layer + att + "self.key.weight"], sd[layer + att + "self.key.bias"] = _rand(h, kv_in), _rand(h)
            sd[layer + att + "self.value.weight"], sd[layer + att + "self.value.bias"] = _rand(h, kv_in), _rand(h)
            sd[layer + att + "output.dense.weight"], sd[layer + att + "output.dense.bias"] = _rand(h, h), _rand(h)
            sd[layer + att + "output.LayerNorm.weight"], sd[layer + att + "output.LayerNorm.bias"] = _norm(h)
        sd[layer + "intermediate.dense.weight"], sd[layer + "intermediate.dense.bias"] = _rand(TINY_MED["intermediate_size"], h), _rand(TINY_MED["intermediate_size"])
        sd[layer + "output.dense.weight"], sd[layer + "output.dense.bias"] = _rand(h, TINY_MED["intermediate_size"]), _rand(h)
        sd[layer + "output.LayerNorm.weight"], sd[layer + "output.LayerNorm.bias"] = _norm(h)
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = _rand(8, w), _rand(8)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = _rand(8, h), _rand(8)
    for idx, (o, i) in zip((0, 2, 4, 6, 7), [(1024, h), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"] = _rand(o, i), _rand(o)
    return sd


def write_imagereward(folder: Path, sd: dict | None = None) -> Path:
    """``ImageReward.pt`` + ``med_config.json`` + a toy WordPiece ``vocab.txt`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sd if sd is not None else imagereward_state_dict(), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(TINY_MED))
    (folder / "vocab.txt").write_text("\n".join(WORDPIECE) + "\n")
    return folder
