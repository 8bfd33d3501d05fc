"""Convert an official SiT checkpoint (github.com/willisma/SiT, e.g. ``SiT-XL-2-256x256.pt``).

The official state dict (SiT's ``models.SiT``, DiT's layout) has the keys::

    x_embedder.proj.{weight,bias}            patch embedding conv [D, C, p, p]
    pos_embed                                fixed 2-D sin-cos table [1, T, D]
    t_embedder.mlp.{0,2}.{weight,bias}       timestep MLP (256 -> D -> D)
    y_embedder.embedding_table.weight        [num_classes + 1, D] (last row: null class)
    blocks.{i}.attn.qkv.{weight,bias}        fused q, k, v [3D, D]
    blocks.{i}.attn.proj.{weight,bias}
    blocks.{i}.mlp.fc1.{weight,bias}, blocks.{i}.mlp.fc2.{weight,bias}
    blocks.{i}.adaLN_modulation.1.{weight,bias}   [6D, D]
    final_layer.linear.{weight,bias}         [p*p*out_channels, D]
    final_layer.adaLN_modulation.1.{weight,bias}  [2D, D]

and maps onto :class:`SiTTransformer2DModel` (diffusers' DiT names): the shared time/label
embedder is copied into every block's ``norm1.emb``, ``qkv`` is split into ``to_q/to_k/to_v``,
``pos_embed`` is checked against the model's own sin-cos table (same formula; not stored).
The number of heads is not in the weights: it is taken from the known SiT sizes
(XL 1152 -> 16, L 1024 -> 16, B 768 -> 12, S 384 -> 6) or must be given.

CFG: the official ``forward_with_cfg`` guides only the first 3 channels of SD-VAE's 4 latent
channels (the 4th keeps the conditional velocity); the written pipeline stores
``guidance_channels=3`` for such checkpoints (``"official"``, the default) so that it samples as
the official code does; ``"all"`` stores None (standard CFG on every channel).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..deprecation import resolve_dtype
from ..pipelines.sit_transformer import SiTTransformer2DModel

SIT_HEADS_BY_HIDDEN = {1152: 16, 1024: 16, 768: 12, 384: 6}
"""num_heads of the official SiT-{XL,L,B,S} models by hidden size."""

SIT_OFFICIAL_GUIDANCE_CHANNELS = 3
"""Leading channels the official ``forward_with_cfg`` guides (``model_out[:, :3]``)."""

_BLOCK_KEYS = (
    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
)
_GLOBAL_KEYS = (
    "x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
)


def _first_sentence(err: Exception) -> str:
    """``Type: first sentence`` of an exception's message, one line, no terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    first = text.split(". ")[0].splitlines()[0][:120] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def load_sit_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a SiT ``.pt`` (raw state dict, or train.py's ``{"ema": ...}``) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"`checkpoint_path` {str(path)!r} is not a file; pass the SiT .pt checkpoint.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated, not a torch / safetensors file, pickled objects
        raise UserError(
            f"`checkpoint_path` {str(path)!r} is not a readable SiT checkpoint ({_first_sentence(err)}); "
            "pass the .pt state dict of github.com/willisma/SiT (or a .safetensors of it)."
        ) from err
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("ema"), dict):
        checkpoint = checkpoint["ema"]  # SiT's train.py checkpoints: use the EMA weights, like find_model
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise UserError(f"`checkpoint_path` {str(path)!r} does not hold a SiT state dict (name -> tensor).")
    return checkpoint


def expected_sit_keys(depth: int) -> set[str]:
    """Every key of an official SiT state dict with ``depth`` blocks."""
    return set(_GLOBAL_KEYS) | {f"blocks.{i}.{k}" for i in range(depth) for k in _BLOCK_KEYS}


def _depth(state_dict: dict[str, torch.Tensor]) -> int:
    indices = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(indices) + 1 if indices else 0


def _name_keys(keys: set[str], limit: int = 20) -> str:
    names = sorted(keys)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_sit_keys(state_dict: dict[str, torch.Tensor]) -> int:
    """Refuse a state dict whose key set is not SiT's; returns the depth.

    Raises ValueError naming the missing and the unexpected keys."""
    depth = _depth(state_dict)
    expected = expected_sit_keys(depth)
    missing, unexpected = expected - set(state_dict), set(state_dict) - expected
    if depth == 0 or missing or unexpected:
        parts = []
        if depth == 0:
            parts.append("no `blocks.{i}.*` keys")
        if missing:
            parts.append(f"missing keys: {_name_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_name_keys(unexpected)}")
        raise UserError(
            "not an official SiT/DiT state dict (" + "; ".join(parts) + "). Expected the keys of "
            "github.com/willisma/SiT models.SiT (x_embedder, pos_embed, t_embedder, y_embedder, blocks.{i}, "
            "final_layer)."
        )
    return depth


def sit_config_from_state_dict(
    state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None
) -> dict[str, Any]:
    """The :class:`SiTTransformer2DModel` config implied by an official SiT state dict's shapes."""
    depth = check_sit_keys(state_dict)
    proj = state_dict["x_embedder.proj.weight"]
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    num_patches = state_dict["pos_embed"].shape[-2]
    grid = int(round(num_patches**0.5))
    if grid * grid != num_patches:
        raise UserError(f"`pos_embed` has {num_patches} positions, not a square grid.")
    if num_attention_heads is None:
        if hidden not in SIT_HEADS_BY_HIDDEN:
            raise UserError(
                f"hidden size {hidden} is not an official SiT size {sorted(SIT_HEADS_BY_HIDDEN)}; "
                "pass `num_attention_heads` (--num_attention_heads)."
            )
        num_attention_heads = SIT_HEADS_BY_HIDDEN[hidden]
    if hidden % num_attention_heads:
        raise UserError(f"`num_attention_heads` {num_attention_heads} does not divide the hidden size {hidden}.")
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(
            f"final_layer.linear gives {out_channels} output channels; expected {in_channels} or "
            f"{2 * in_channels} (learn_sigma) for {in_channels} input channels."
        )
    return {
        "sample_size": grid * patch,
        "patch_size": patch,
        "in_channels": in_channels,
        "num_layers": depth,
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": hidden // num_attention_heads,
        "num_classes": state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
        "learn_sigma": out_channels == 2 * in_channels,
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
    }


def convert_sit_state_dict(state_dict: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official SiT keys -> :class:`SiTTransformer2DModel` keys (``pos_embed`` left out).

    The values are views of the input tensors (the embedder copies share one tensor each):
    load them with ``load_state_dict``, clone before saving them elsewhere."""
    sd = state_dict
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = o + "norm1.emb."
        for kind in ("weight", "bias"):
            out[emb + f"timestep_embedder.linear_1.{kind}"] = sd[f"t_embedder.mlp.0.{kind}"]
            out[emb + f"timestep_embedder.linear_2.{kind}"] = sd[f"t_embedder.mlp.2.{kind}"]
            q, k, v = sd[b + f"attn.qkv.{kind}"].chunk(3, dim=0)
            out[o + f"attn1.to_q.{kind}"], out[o + f"attn1.to_k.{kind}"], out[o + f"attn1.to_v.{kind}"] = q, k, v
            out[o + f"attn1.to_out.0.{kind}"] = sd[b + f"attn.proj.{kind}"]
            out[o + f"ff.net.0.proj.{kind}"] = sd[b + f"mlp.fc1.{kind}"]
            out[o + f"ff.net.2.{kind}"] = sd[b + f"mlp.fc2.{kind}"]
            out[o + f"norm1.linear.{kind}"] = sd[b + f"adaLN_modulation.1.{kind}"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
    return out


def sit_transformer_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    num_attention_heads: int | None = None,
    dtype: torch.dtype | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
) -> SiTTransformer2DModel:
    """Build a :class:`SiTTransformer2DModel` holding an official SiT state dict's weights, in ``dtype``
    (default fp32; ``torch_dtype=`` is the deprecated spelling)."""
    torch_dtype = resolve_dtype(dtype, torch_dtype, torch.float32)
    config = sit_config_from_state_dict(state_dict, num_attention_heads)
    model = SiTTransformer2DModel(**config)
    table = model.pos_embed.pos_embed
    given = state_dict["pos_embed"].float().reshape(table.shape)
    if not torch.allclose(given, table, atol=1e-4):
        raise UserError(
            "the checkpoint's `pos_embed` is not SiT's fixed 2-D sin-cos table for a "
            f"{config['sample_size'] // config['patch_size']}^2 grid (max abs diff "
            f"{float((given - table).abs().max()):.3g}); this converter supports the fixed table only."
        )
    converted = convert_sit_state_dict(state_dict, config["num_layers"])
    converted = {k: v.float() for k, v in converted.items()}
    try:
        result = model.load_state_dict(converted, strict=False)
    except RuntimeError as err:  # shapes that disagree with the ones the config was read from
        raise UserError(f"inconsistent SiT checkpoint shapes: {err}") from err
    if result.missing_keys or result.unexpected_keys:  # a bug in the key map, not bad input
        raise RuntimeError(
            f"SiT key map incomplete: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    if torch_dtype != torch.float32:
        model = model.to(torch_dtype)  # the resolved `dtype`
    return model.eval()


def official_guidance_channels(in_channels: int) -> int | None:
    """``guidance_channels`` reproducing the official ``forward_with_cfg`` for ``in_channels``
    state channels: 3, or None (every channel) when the model has 3 channels or fewer."""
    return SIT_OFFICIAL_GUIDANCE_CHANNELS if in_channels > SIT_OFFICIAL_GUIDANCE_CHANNELS else None


def resolve_guidance_channels(guidance_channels: int | str | None, in_channels: int) -> int | None:
    """``"official"`` -> :func:`official_guidance_channels`; ``"all"`` or None -> None; an integer as is."""
    if guidance_channels == "official":
        return official_guidance_channels(in_channels)
    if guidance_channels is None or guidance_channels == "all":
        return None
    if isinstance(guidance_channels, str) and guidance_channels.strip().isdigit():
        return int(guidance_channels)
    if isinstance(guidance_channels, int) and not isinstance(guidance_channels, bool):
        return guidance_channels
    raise UserError(
        f"`guidance_channels` must be 'official', 'all' or a channel count; got {guidance_channels!r}."
    )


def convert_sit_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    vae: Any = None,
    num_attention_heads: int | None = None,
    default_num_inference_steps: int = 50,
    dtype: torch.dtype | None = None,
    guidance_channels: int | str | None = "official",
    torch_dtype: torch.dtype | None = None,
):
    """Official SiT checkpoint -> :class:`~diffusers_am.pipelines.sit.SiTPipeline` (saved to
    ``output_dir`` when given).

    ``vae``: an ``AutoencoderKL``, a local folder / Hub id of one (SiT used
    ``stabilityai/sd-vae-ft-ema`` or ``-mse``), or None for a pixel-space model.
    ``guidance_channels``: the pipeline's CFG channel rule (:func:`resolve_guidance_channels`);
    ``"official"`` (default) guides the first 3 of 4 latent channels like ``forward_with_cfg``."""
    from diffusers import AutoencoderKL

    from ..pipelines.sit import SiTPipeline

    dtype = resolve_dtype(dtype, torch_dtype, torch.float32)
    state_dict = load_sit_checkpoint(checkpoint_path)
    try:
        transformer = sit_transformer_from_state_dict(state_dict, num_attention_heads, dtype)
    except ValueError as err:
        raise UserError(f"`checkpoint_path` {str(checkpoint_path)!r}: {err}") from err
    channels = resolve_guidance_channels(guidance_channels, transformer.config.in_channels)
    if isinstance(vae, (str, os.PathLike)):
        try:
            vae = AutoencoderKL.from_pretrained(str(vae), dtype=dtype)
        except Exception as err:  # missing folder, offline, unknown repo ... 
            raise UserError(
                f"`vae` {str(vae)!r} is neither a local AutoencoderKL folder nor reachable on the Hub "
                f"({type(err).__name__}); offline, download it elsewhere and pass its folder."
            ) from err
    pipeline = SiTPipeline(
        transformer, vae=vae, default_num_inference_steps=default_num_inference_steps, guidance_channels=channels
    )
    if output_dir is not None:
        pipeline.save_pretrained(str(output_dir))
    return pipeline
