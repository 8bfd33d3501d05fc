"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``) as a paper-time flow.

State: the VAE latent [B, 16, H/8, W/8] fp32, exactly the pipeline's latents (the transformer
patchifies itself). Sigmas: the scheduler's own (fixed ``shift``; dynamic shifting with the
pipeline's ``calculate_shift`` mu when the scheduler asks for it); the transformer gets
``timestep = 1000 * sigma``. CFG is batched [uncond, cond] with the empty negative prompt, as
the stock pipeline (``guidance_scale`` None: 7.0; <= 1 turns CFG off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .flowmatch import FlowMatchAdapter, unmatched_lora_targets


@dataclass
class SD3Prompts:
    """prompt_embeds [B, L, D], pooled [B, P], and the empty prompt's, repeated to B."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor


class SD3Adapter(FlowMatchAdapter):
    """Adapter for ``StableDiffusion3Pipeline`` (and ``AdjointMatchingStableDiffusion3Pipeline``)."""

    pipeline_class_name = "StableDiffusion3Pipeline"
    default_guidance_scale = 7.0

    def default_lora_targets(self) -> list[str]:
        """Attention projections of both streams, as diffusers' SD3 DreamBooth LoRA example (those
        the model has: a one-block model's context stream has no ``to_add_out``)."""
        names = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
        return [n for n in names if not unmatched_lora_targets(self.transformer, [n])]

    def resolution_multiple(self) -> int:
        return self.pipeline.vae_scale_factor * self.transformer.config.patch_size

    def _latent_hw(self, resolution: int) -> int:
        return self.check_resolution(resolution) // self.pipeline.vae_scale_factor

    def _sigmas(self, num_inference_steps: int, resolution: int) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

        scheduler = self._fresh_scheduler()
        config = scheduler.config
        kwargs = {}
        if config.get("use_dynamic_shifting", None):
            side = self._latent_hw(resolution) // self.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                side * side,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        retrieve_timesteps(scheduler, num_inference_steps, "cpu", **kwargs)
        return scheduler.sigmas.float()

    def initial_noise(self, batch_size: int, resolution: int, generator: torch.Generator | None) -> torch.Tensor:
        """[B, C, H/8, W/8] fp32 standard normal (the pipeline's latents)."""
        side = self._latent_hw(resolution)
        return self._noise((int(batch_size), self.transformer.config.in_channels, side, side), generator)

    def _encode(self, prompts: list[str], device: torch.device) -> SD3Prompts:
        kwargs = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        embeds, neg, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True, **kwargs
        )
        cast = lambda t: t.to(device, self.dtype)  # noqa: E731
        return SD3Prompts(cast(embeds), cast(pooled), cast(neg), cast(neg_pooled))

    def _predict(self, module, x: torch.Tensor, sigma: torch.Tensor, encoded: SD3Prompts, guidance_scale: float | None) -> torch.Tensor:
        if not isinstance(encoded, SD3Prompts):
            raise UserError(f"`encoded` must come from SD3Adapter.encode_conditions; got {type(encoded).__name__}.")
        b = x.shape[0]
        if encoded.prompt_embeds.shape[0] != b:
            raise UserError(f"states have batch {b} but `encoded` holds {encoded.prompt_embeds.shape[0]} prompts.")
        g = self.resolve_guidance(guidance_scale)
        cfg = g > 1.0
        hidden = x.to(self.dtype)
        embeds, pooled = encoded.prompt_embeds, encoded.pooled_prompt_embeds
        if cfg:
            hidden = torch.cat([hidden, hidden])
            embeds = torch.cat([encoded.negative_prompt_embeds, embeds])
            pooled = torch.cat([encoded.negative_pooled_prompt_embeds, pooled])
        timestep = (sigma.float() * self.pipeline.scheduler.config.num_train_timesteps).expand(hidden.shape[0])
        out = module(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]
        if cfg:
            uncond, cond = out.chunk(2)
            out = uncond + g * (cond - uncond)
        return out

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> images [B, 3, 8h, 8w] in [0, 1]: ``z / scaling_factor + shift_factor``,
        ``vae.decode``, ``* 0.5 + 0.5``, clamped as the stock postprocessing."""
        if x.dim() != 4:
            raise UserError(f"`x` must be latents [B, C, h, w]; got shape {tuple(x.shape)}.")
        vae = self.pipeline.vae
        z = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() * 0.5 + 0.5).clamp(0.0, 1.0)
