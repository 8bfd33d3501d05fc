"""FLUX.2-klein (``Flux2KleinPipeline``, distilled and base) as a paper-time flow.

State: the pipeline's patchified, batch-norm-normalised latent in image layout
[B, 128, H/16, W/16] fp32 (the pipeline draws its noise in exactly this shape before packing
it to [B, H*W/256, 128]); the transformer sees it packed. Sigmas, mu and timestep scaling are
the pipeline's own (``compute_empirical_mu`` + ``retrieve_timesteps`` from its module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from .flowmatch import FlowMatchAdapter


@dataclass
class Flux2Prompts:
    """Encoded prompts: embeds [B, L, 3*hidden], text_ids [B, L, 4]; the empty prompt's
    (``negative_*``, batch 1) only for klein-base with CFG."""

    prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_text_ids: torch.Tensor | None = None


class Flux2KleinAdapter(FlowMatchAdapter):
    """Adapter for ``Flux2KleinPipeline`` (and ``AdjointMatchingFlux2KleinPipeline``).

    ``guidance_scale`` (None: 1.0 distilled, 4.0 base as the stock pipeline) applies CFG with a
    second forward on the empty prompt only on klein-base; on the distilled model a value > 1
    is ignored with a warning, as in the stock pipeline.
    """

    pipeline_class_name = "Flux2KleinPipeline"
    text_encoder_out_layers: tuple[int, ...] = (9, 18, 27)

    @property
    def is_distilled(self) -> bool:
        return bool(self.pipeline.config.get("is_distilled", False))

    @property
    def default_guidance_scale(self) -> float:  # type: ignore[override]
        return 1.0 if self.is_distilled else 4.0

    def default_lora_targets(self) -> list[str]:
        """to_k, to_q, to_v, to_out.0, to_qkv_mlp_proj and each single block's attn.to_out."""
        singles = len(getattr(self.transformer, "single_transformer_blocks", []))
        return ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj"] + [
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)
        ]

    # -- geometry -------------------------------------------------------------------------
    def _latent_hw(self, resolution: int) -> int:
        return self.check_resolution(resolution) // (self.pipeline.vae_scale_factor * 2)

    def _sigmas(self, num_inference_steps: int, resolution: int) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

        side = self._latent_hw(resolution)
        scheduler = self._fresh_scheduler()
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=side * side, num_steps=num_inference_steps)
        retrieve_timesteps(scheduler, num_inference_steps, "cpu", sigmas=sigmas, mu=mu)
        return scheduler.sigmas.float()

    def initial_noise(self, batch_size: int, resolution: int, generator: torch.Generator | None) -> torch.Tensor:
        """[B, 128, H/16, W/16] fp32 standard normal (the pipeline's draw before packing)."""
        side = self._latent_hw(resolution)
        channels = self.transformer.config.in_channels
        return self._noise((int(batch_size), channels, side, side), generator)

    @staticmethod
    def pack(x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B, h*w, C] (row-major tokens, the pipeline's ``_pack_latents``)."""
        b, c, h, w = x.shape
        return x.reshape(b, c, h * w).permute(0, 2, 1)

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """[B, h*w, C] -> [B, C, h, w], the inverse of :meth:`pack`."""
        b, _, c = tokens.shape
        return tokens.permute(0, 2, 1).reshape(b, c, h, w)

    # -- conditioning ---------------------------------------------------------------------
    def _encode_one(self, prompts: list[str], device: torch.device):
        kwargs = {"text_encoder_out_layers": self.text_encoder_out_layers}
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        embeds, ids = self.pipeline.encode_prompt(prompt=prompts, device=device, **kwargs)
        return embeds.to(device=device, dtype=self.dtype), ids.to(device)

    def _encode(self, prompts: list[str], device: torch.device) -> Flux2Prompts:
        embeds, ids = self._encode_one(prompts, device)
        if self.is_distilled:
            return Flux2Prompts(embeds, ids)
        key = (str(device), self.dtype, self.max_sequence_length)
        cache = self.__dict__.setdefault("_empty_prompt_cache", {})
        if key not in cache:  # the empty prompt is the same for every batch: encode it once
            cache[key] = self._encode_one([""], device)
        neg, neg_ids = cache[key]
        return Flux2Prompts(embeds, ids, neg, neg_ids)

    def _cfg(self, guidance_scale: float | None) -> tuple[bool, float]:
        """(use CFG, scale): CFG only on klein-base with a scale > 1, as the stock pipeline."""
        g = self.resolve_guidance(guidance_scale)
        return (not self.is_distilled and g > 1.0), g

    def flow(self, encoded: Any, *, guidance_scale: float | None = None, train_module: torch.nn.Module | None = None):
        g = self.resolve_guidance(guidance_scale)
        if self.is_distilled and guidance_scale is not None and g > 1.0:  # once per batch, not per velocity call
            self._warn(f"Guidance scale {g} is ignored for step-wise distilled models.")
        return super().flow(encoded, guidance_scale=guidance_scale, train_module=train_module)

    def _predict(self, module: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, encoded: Flux2Prompts, guidance_scale: float | None) -> torch.Tensor:
        if not isinstance(encoded, Flux2Prompts):
            raise UserError(f"`encoded` must come from Flux2KleinAdapter.encode_conditions; got {type(encoded).__name__}.")
        b, _, h, w = x.shape
        if encoded.prompt_embeds.shape[0] != b:
            raise UserError(f"states have batch {b} but `encoded` holds {encoded.prompt_embeds.shape[0]} prompts.")
        dtype = self.dtype
        tokens = self.pack(x.to(dtype))
        img_ids = self.pipeline._prepare_latent_ids(x).to(x.device)
        # the pipeline passes timestep = sigma * 1000 in the latents' dtype, divided by 1000
        timestep = (sigma.float() * 1000).expand(b).to(dtype) / 1000
        use_cfg, g = self._cfg(guidance_scale)

        def run(embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            out = module(
                hidden_states=tokens,
                timestep=timestep,
                guidance=None,
                encoder_hidden_states=embeds,
                txt_ids=ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            return out[:, : h * w]

        pred = run(encoded.prompt_embeds, encoded.text_ids)
        if use_cfg:
            neg = run(encoded.negative_prompt_embeds.expand(b, -1, -1), encoded.negative_text_ids.expand(b, -1, -1))
            pred = neg + g * (pred - neg)
        return self.unpack(pred, h, w)

    # -- pixels ---------------------------------------------------------------------------
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 128, h, w] -> images [B, 3, 16h, 16w] in [0, 1], differentiable.

        Un-normalise with the VAE's batch-norm statistics, unpatchify, ``vae.decode``,
        ``* 0.5 + 0.5`` and clamp to [0, 1] exactly as the stock postprocessing does (the
        gradient is zero on saturated pixels)."""
        if x.dim() != 4:
            raise UserError(f"`x` must be patchified latents [B, C, h, w]; got shape {tuple(x.shape)}.")
        vae = self.pipeline.vae
        z = x.to(vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z)
        z = self.pipeline._unpatchify_latents(z * std + mean)
        image = vae.decode(z, return_dict=False)[0]
        return (image.float() * 0.5 + 0.5).clamp(0.0, 1.0)
