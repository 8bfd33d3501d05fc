"""Tiny random pipelines written in the real diffusers format, fully offline.

Each ``save_tiny_*`` builds seeded random components, wraps them in the stock pipeline class,
writes it with ``save_pretrained`` into a folder and returns that folder; tests load it back
with ``from_pretrained`` or ``diffusers_am.models.load_model_adapter``. Tokenizers are byte-level
BPE (every byte one token, no merges) built from the ``tokenizers`` alphabet: nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_RESOLUTION = 32
"""Pixels per side: with the 4-block tiny VAEs (8x downsampling) this is a 4x4 latent."""

_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _byte_vocab(specials: list[str]) -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for token in specials:
        vocab[token] = len(vocab)
    return vocab


def tiny_qwen_tokenizer():
    """A Qwen2Tokenizer with the Qwen chat markers and a chat template honouring enable_thinking."""
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer(vocab=_byte_vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


def tiny_clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer on single byte-level characters (with and without ``</w>``), no merges."""
    from transformers import CLIPTokenizer

    from tokenizers.pre_tokenizers import ByteLevel

    vocab = _byte_vocab([c + "</w>" for c in sorted(ByteLevel.alphabet())] + ["<|startoftext|>", "<|endoftext|>"])
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>")


def tiny_t5_tokenizer(max_length: int = 32):
    """A T5 (unigram) tokenizer whose pieces are single characters and the word marker."""
    from transformers import T5TokenizerFast

    from tokenizers.pre_tokenizers import ByteLevel

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [(c, -1.0) for c in sorted(ByteLevel.alphabet())]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _tiny_vae_kwargs() -> dict:
    return dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        norm_num_groups=1,
        sample_size=TINY_RESOLUTION,
        mid_block_add_attention=False,
    )


def build_tiny_flux2_klein(is_distilled: bool = True, seed: int = 0):
    """A Flux2KleinPipeline with random tiny components (not saved).

    Text encoder: Qwen3 with 28 layers of width 16, so the pipeline's default hidden layers
    (9, 18, 27) exist and ``joint_attention_dim = 3 * 16``. VAE: 8x downsampling, 1 latent
    channel (patchified to 4). Transformer: 1 double + 1 single block, 2 heads of 16.
    """
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=28,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
        )
    ).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=48,
        timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=False,
    )
    vae = AutoencoderKLFlux2(latent_channels=1, use_quant_conv=False, use_post_quant_conv=False, **_tiny_vae_kwargs())
    # non-trivial batch-norm statistics so the un-normalisation is exercised
    vae.bn.running_mean.copy_(torch.randn_like(vae.bn.running_mean) * 0.1)
    vae.bn.running_var.copy_(torch.rand_like(vae.bn.running_var) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0, time_shift_type="exponential")
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, is_distilled=is_distilled
    )


def save_tiny_flux2_klein(directory: str | Path, is_distilled: bool = True, seed: int = 0) -> Path:
    """Write a tiny random Flux2KleinPipeline with ``save_pretrained``; returns the folder."""
    directory = Path(directory)
    build_tiny_flux2_klein(is_distilled=is_distilled, seed=seed).save_pretrained(directory)
    return directory


def save_random_lora(adapter, out_dir: str | Path, *, rank: int, seed: int, std: float = 0.5) -> Path:
    """Add a LoRA of ``rank`` to a model adapter, draw its B matrices N(0, std) after ``torch.manual_seed(seed)``
    (so that it changes the samples; A keeps peft's init) and save it to ``out_dir``; returns ``out_dir``."""
    from diffusers_am.models import LoraSettings

    adapter.add_lora(LoraSettings(rank=rank))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    adapter.save_lora(str(out_dir))
    return Path(out_dir)


def mean_brightness(images: torch.Tensor, prompts: list) -> torch.Tensor:
    """A differentiable test reward for text pipelines: [B, C, H, W] in [0, 1] -> [B] mean pixel."""
    return images.float().mean(dim=(1, 2, 3))


def _tiny_clip(hidden: int, projection: bool, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        vocab_size=vocab_size,
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _tiny_t5(d_model: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(d_model=d_model, d_kv=8, d_ff=d_model, num_layers=1, num_heads=2, vocab_size=vocab_size, relative_attention_num_buckets=8)
    return T5EncoderModel(config).eval()


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline with random tiny components: CLIP (pooled, width 32), T5 (width 32),
    8x VAE with 1 latent channel (2x2-packed to 4), 1 double + 1 single block."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8],
    )
    vae = AutoencoderKL(
        latent_channels=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        **_tiny_vae_kwargs(),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096),
        vae=vae,
        text_encoder=_tiny_clip(32, False, len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_t5(32, len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def save_tiny_flux(directory: str | Path, seed: int = 0) -> Path:
    directory = Path(directory)
    build_tiny_flux(seed=seed).save_pretrained(directory)
    return directory


def build_tiny_sd3(seed: int = 0):
    """A StableDiffusion3Pipeline with random tiny components: two CLIP-with-projection
    (width 16 each, pooled 32), T5 (width 32), 8x VAE with 4 latent channels, one joint block."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=TINY_RESOLUTION // 8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16,
    )
    vae = AutoencoderKL(
        latent_channels=4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        **_tiny_vae_kwargs(),
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=_tiny_clip(16, True, len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=_tiny_clip(16, True, len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_tiny_t5(32, len(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )


def save_tiny_sd3(directory: str | Path, seed: int = 0) -> Path:
    directory = Path(directory)
    build_tiny_sd3(seed=seed).save_pretrained(directory)
    return directory
