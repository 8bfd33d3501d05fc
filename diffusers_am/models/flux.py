"""FLUX.1 (``FluxPipeline``: dev with guidance embedding, schnell without) as a paper-time flow.

State: the VAE latent in image layout [B, C, H/8, W/8] fp32 (the pipeline draws its noise in
this shape before 2x2-packing it to [B, H*W/256, 4C]); the transformer sees it packed, with
the pipeline's 3-D ids. Sigmas: the pipeline's ``linspace(1, 1/N, N)`` shifted with
``calculate_shift`` mu. Conditioning: pooled CLIP + T5 embeddings from ``encode_prompt``.
``guidance_scale`` (None: 3.5, the stock default) feeds the guidance embedding of
guidance-distilled checkpoints; true CFG (``true_cfg_scale``) is not used by the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .flowmatch import FlowMatchAdapter


@dataclass
class FluxPrompts:
    """prompt_embeds [B, L, D] (T5), pooled_prompt_embeds [B, P] (CLIP), text_ids [L, 3]."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor


class FluxAdapter(FlowMatchAdapter):
    """Adapter for ``FluxPipeline`` (and ``AdjointMatchingFluxPipeline``)."""

    pipeline_class_name = "FluxPipeline"
    default_guidance_scale = 3.5

    def default_lora_targets(self) -> list[str]:
        """attn.to_k, attn.to_q, attn.to_v, attn.to_out.0 (double and single blocks), as
        diffusers' FLUX DreamBooth LoRA example."""
        return ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]

    @property
    def has_guidance_embeds(self) -> bool:
        return bool(self.transformer.config.get("guidance_embeds", False))

    def _latent_hw(self, resolution: int) -> int:
        return 2 * (self.check_resolution(resolution) // (self.pipeline.vae_scale_factor * 2))

    def _sigmas(self, num_inference_steps: int, resolution: int) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        side = self._latent_hw(resolution)
        scheduler = self._fresh_scheduler()
        config = scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            (side // 2) * (side // 2),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, num_inference_steps, "cpu", sigmas=sigmas, mu=mu)
        return scheduler.sigmas.float()

    def initial_noise(self, batch_size: int, resolution: int, generator: torch.Generator | None) -> torch.Tensor:
        """[B, C, H/8, W/8] fp32 standard normal (the pipeline's draw before packing)."""
        side = self._latent_hw(resolution)
        return self._noise((int(batch_size), self.transformer.config.in_channels // 4, side, side), generator)

    def _encode(self, prompts: list[str], device: torch.device) -> FluxPrompts:
        kwargs = {} if self.max_sequence_length is None else {"max_sequence_length": self.max_sequence_length}
        embeds, pooled, text_ids = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=device, **kwargs)
        return FluxPrompts(embeds.to(device, self.dtype), pooled.to(device, self.dtype), text_ids.to(device))

    def flow(self, encoded, *, guidance_scale: float | None = None, train_module: torch.nn.Module | None = None):
        g = self.resolve_guidance(guidance_scale)
        if guidance_scale is not None and g != self.default_guidance_scale and not self.has_guidance_embeds:
            self._warn(f"guidance_scale {g} is ignored: this FLUX transformer has no guidance embedding.")
        return super().flow(encoded, guidance_scale=guidance_scale, train_module=train_module)

    def _predict(self, module, x: torch.Tensor, sigma: torch.Tensor, encoded: FluxPrompts, guidance_scale: float | None) -> torch.Tensor:
        if not isinstance(encoded, FluxPrompts):
            raise UserError(f"`encoded` must come from FluxAdapter.encode_conditions; got {type(encoded).__name__}.")
        b, c, h, w = x.shape
        if encoded.prompt_embeds.shape[0] != b:
            raise UserError(f"states have batch {b} but `encoded` holds {encoded.prompt_embeds.shape[0]} prompts.")
        pipe, dtype = self.pipeline, self.dtype
        tokens = pipe._pack_latents(x.to(dtype), b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, encoded.text_ids.dtype)
        timestep = (sigma.float() * 1000).expand(b).to(dtype) / 1000
        guidance = None
        if self.has_guidance_embeds:
            guidance = torch.full([b], self.resolve_guidance(guidance_scale), device=x.device, dtype=torch.float32)
        out = module(
            hidden_states=tokens,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=encoded.pooled_prompt_embeds,
            encoder_hidden_states=encoded.prompt_embeds,
            txt_ids=encoded.text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        vsf = pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * vsf, w * vsf, vsf)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> images [B, 3, 8h, 8w] in [0, 1]: ``z / scaling_factor + shift_factor``,
        ``vae.decode``, ``* 0.5 + 0.5``, clamped as the stock postprocessing (zero gradient on
        saturated pixels)."""
        if x.dim() != 4:
            raise UserError(f"`x` must be latents [B, C, h, w]; got shape {tuple(x.shape)}.")
        vae = self.pipeline.vae
        z = x.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() * 0.5 + 0.5).clamp(0.0, 1.0)
