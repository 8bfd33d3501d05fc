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
    """A CLIPTokenizer-compatible byte-level tokenizer (GPT-2 style files, no merges)."""
    from transformers import CLIPTokenizer

    vocab = _byte_vocab(["<|startoftext|>", "<|endoftext|>"])
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_length, pad_token="<|endoftext|>")


def tiny_t5_tokenizer(max_length: int = 32):
    """A T5TokenizerFast on a word-level-free unigram vocabulary of single bytes."""
    from transformers import T5TokenizerFast

    from tokenizers.pre_tokenizers import ByteLevel

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in sorted(ByteLevel.alphabet())]
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


def mean_brightness(images: torch.Tensor, prompts: list) -> torch.Tensor:
    """A differentiable test reward for text pipelines: [B, C, H, W] in [0, 1] -> [B] mean pixel."""
    return images.float().mean(dim=(1, 2, 3))
