"""open_clip ViT checkpoints as transformers ``CLIPModel``s: the config and the key mapping.

open_clip (3.x) stores a CLIP as ``visual.*`` (conv1, class_embedding, positional_embedding,
ln_pre, transformer.resblocks.i.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj},
ln_post, proj) plus the text tower at the top level (token_embedding, positional_embedding,
transformer.resblocks.i.*, ln_final, text_projection) and ``logit_scale``. Fused q/k/v projections
are split and right-multiplied projections transposed for ``CLIPModel``'s Linear layers.
Only the plain ViT/transformer CLIP layout is handled (no attentional pooler, no layer scale).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from ..errors import UserError
from .checkpoints import check_keys

# open_clip's model config for ViT-H-14 (the HPSv2 backbone): open_clip/model_configs/ViT-H-14.json
VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}
_BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}


def clip_config_from_open_clip(cfg: Mapping[str, Any]) -> Any:
    """A transformers ``CLIPConfig`` equal to an open_clip model config (JSON format)."""
    from transformers import CLIPConfig

    v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    head_width = v.get("head_width", 64)
    if v["width"] % head_width:
        raise UserError(f"`model_config`: vision width {v['width']} is not a multiple of head_width {head_width}.")
    vision = dict(
        hidden_size=v["width"], intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=v["layers"], num_attention_heads=v["width"] // head_width,
        image_size=v["image_size"], patch_size=v["patch_size"], hidden_act=act, layer_norm_eps=1e-5,
    )
    text = dict(
        hidden_size=t["width"], intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
        num_hidden_layers=t["layers"], num_attention_heads=t.get("heads", 8),
        max_position_embeddings=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408),
        hidden_act=act, layer_norm_eps=1e-5, eos_token_id=t.get("vocab_size", 49408) - 1,
        bos_token_id=t.get("vocab_size", 49408) - 2, pad_token_id=0,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg["embed_dim"])


def expected_open_clip_keys(cfg: Mapping[str, Any]) -> set[str]:
    """Every key an open_clip state dict of this config holds."""
    block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", *(k for k in _BLOCK if not k.startswith("ln_"))]
    block += ["ln_2.weight", "ln_2.bias"]
    keys = {"logit_scale", "positional_embedding", "text_projection", "token_embedding.weight", "ln_final.weight", "ln_final.bias"}
    keys |= {"visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight"}
    keys |= {f"visual.{n}.{p}" for n in ("ln_pre", "ln_post") for p in ("weight", "bias")}
    keys |= {f"transformer.resblocks.{i}.{b}" for i in range(cfg["text_cfg"]["layers"]) for b in block}
    keys |= {f"visual.transformer.resblocks.{i}.{b}" for i in range(cfg["vision_cfg"]["layers"]) for b in block}
    return keys


def _convert_block(prefix_in: str, prefix_out: str, sd: Mapping[str, torch.Tensor], out: dict) -> None:
    for src, dst in _BLOCK.items():
        out[f"{prefix_out}.{dst}"] = sd[f"{prefix_in}.{src}"]
    for kind in ("weight", "bias"):
        q, k, v = sd[f"{prefix_in}.attn.in_proj_{kind}"].chunk(3, dim=0)
        out[f"{prefix_out}.self_attn.q_proj.{kind}"] = q
        out[f"{prefix_out}.self_attn.k_proj.{kind}"] = k
        out[f"{prefix_out}.self_attn.v_proj.{kind}"] = v


def convert_open_clip_state_dict(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], *, source: str) -> dict[str, torch.Tensor]:
    """open_clip keys -> ``CLIPModel`` keys; ValueError naming missing/unexpected keys first."""
    check_keys(expected_open_clip_keys(cfg), sd.keys(), source=source)
    out: dict[str, torch.Tensor] = {"logit_scale": sd["logit_scale"].reshape(())}
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out["text_model.final_layer_norm.weight"] = sd["ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = sd["ln_final.bias"]
    out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    for n_in, n_out in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"vision_model.{n_out}.{p}"] = sd[f"visual.{n_in}.{p}"]
    out["visual_projection.weight"] = sd["visual.proj"].t().contiguous()
    pattern = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.")
    blocks = sorted({(m.group(1) or "", int(m.group(2))) for k in sd if (m := pattern.match(k))})
    for vis, i in blocks:
        tower = "vision_model" if vis else "text_model"
        _convert_block(f"{vis}transformer.resblocks.{i}", f"{tower}.encoder.layers.{i}", sd, out)
    return out
