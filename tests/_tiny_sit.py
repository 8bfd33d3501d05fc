"""Tiny random SiT components for offline tests (pixel space and SD-VAE-style latent space)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from diffusers_am.pipelines.sit_transformer import SiTTransformer2DModel
from diffusers_am.pipelines.sit import SiTPipeline


def tiny_pixel_transformer(num_classes: int = 10, seed: int = 0) -> SiTTransformer2DModel:
    """1-channel 8x8 pixel model, patch 2, 2 blocks, hidden 16, with non-zero adaLN/outputs."""
    torch.manual_seed(seed)
    model = SiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=1, num_layers=2,
        num_attention_heads=2, attention_head_dim=8, num_classes=num_classes,
    )
    return model.eval()


def tiny_vae(latent_channels: int = 4, seed: int = 0) -> AutoencoderKL:
    """SD-VAE-shaped AutoencoderKL, downsampling 2x, 3 image channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=latent_channels,
        norm_num_groups=4, sample_size=8, scaling_factor=0.18215,
    ).eval()


def tiny_latent_transformer(num_classes: int = 5, seed: int = 0) -> SiTTransformer2DModel:
    """4-channel 4x4 latent model (images 8x8 through :func:`tiny_vae`)."""
    torch.manual_seed(seed)
    return SiTTransformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, num_layers=1,
        num_attention_heads=2, attention_head_dim=8, num_classes=num_classes,
    ).eval()


def tiny_pixel_pipeline(**kwargs) -> SiTPipeline:
    return SiTPipeline(tiny_pixel_transformer(), default_num_inference_steps=4, **kwargs)


def tiny_latent_pipeline(**kwargs) -> SiTPipeline:
    return SiTPipeline(tiny_latent_transformer(), vae=tiny_vae(), default_num_inference_steps=4, **kwargs)


def save_tiny_base_and_lora(root: Path, *, rank: int, seed: int, lora_name: str) -> tuple[Path, Path]:
    """(``root/base``, ``root/<lora_name>``): :func:`tiny_pixel_pipeline` saved, and a random LoRA on it
    (:func:`_tiny_pipelines.save_random_lora`, B ~ N(0, 0.5): it visibly changes the samples)."""
    from _tiny_pipelines import save_random_lora

    from diffusers_am.models.sit import SiTAdapter

    tiny_pixel_pipeline().save_pretrained(root / "base")
    lora = save_random_lora(SiTAdapter.from_pretrained(str(root / "base")), root / lora_name, rank=rank, seed=seed)
    return root / "base", lora
