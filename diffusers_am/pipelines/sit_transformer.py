"""SiT-style class-conditional transformer: diffusers' DiT with PEFT LoRA and SiT's conventions.

SiT (Ma et al. 2024, github.com/willisma/SiT) is the DiT architecture trained as a flow:
``x_t = t * x_data + (1 - t) * noise`` (the "Linear" path, t: 0 noise -> 1 data), the network
predicts the velocity ``x_data - noise`` (paper time, no sign flip), and the raw ``t`` in
[0, 1] goes into the sinusoidal timestep embedding. With ``learn_sigma`` the output has
``2 * in_channels`` channels and the velocity is the first ``in_channels`` (SiT keeps DiT's
learn-sigma head; its second half is unused).

Checked against the SiT code: ``transport/transport.py`` draws ``x0 = noise``, ``x1 = data``,
``t ~ U[0, 1]`` and regresses ``model(x_t, t)`` on the path velocity; the Linear plan
(``path.ICPlan``) has data coefficient ``t`` and noise coefficient ``1 - t``, so the target is
``x1 - x0``; ``sample_ode`` integrates from t0 = 0 to t1 = 1 for velocity models; ``models.py``
embeds the raw t with ``[cos, sin](t * 10000^(-i / 128))`` and returns the first half of the
channels with ``learn_sigma``. So the timestep this model receives is paper time itself.

Differences from :class:`diffusers.DiTTransformer2DModel` (all chosen to reproduce SiT's math):

* timestep frequencies ``exp(-ln(10000) * i / half)`` (``downscale_freq_shift=0``), SiT's and
  DiT's own formula; diffusers' DiT port divides by ``half - 1``;
* layer-norm eps 1e-6 everywhere (SiT's blocks);
* no random label dropout inside the model: class ``num_classes`` is the null (CFG) class
  and training code drops labels itself, so ``train()`` mode never changes a velocity;
* ``forward`` refuses a spatial size other than ``sample_size`` and labels outside
  ``[0, num_classes]`` (ValueError), and accepts a 0-dim or [B] timestep.

Like diffusers' DiT port, every block holds its own copy of the timestep/label embedder
(the checkpoint converter copies SiT's shared embedder into each).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import Timesteps
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.transformers.dit_transformer_2d import DiTTransformer2DModel

from ..errors import UserError
from ..checks import positive_int

# DiffusionPipeline.from_pretrained resolves a component saved under this module's path and
# picks its loading method by looking up base classes (``ModelMixin``) in this namespace.
__all__ = ["ModelMixin", "SiTTransformer2DModel"]

LEGACY_MODULE = "diffusers_am.models.sit_transformer"
"""The path folders saved before this module moved here record in ``model_index.json`` (the embedded
``assets/digits-sit`` among them). diffusers resolves a recorded module from ``sys.modules`` only (it never
imports one a folder names), so this module answers for that name too unless that module is loaded already;
``import diffusers_am.models.sit_transformer`` also works (the module there names the same class)."""
sys.modules.setdefault(LEGACY_MODULE, sys.modules[__name__])


class SiTTransformer2DModel(DiTTransformer2DModel, PeftAdapterMixin):
    """DiT backbone for a class-conditional flow in paper time.

    Args:
        sample_size: side of the (square) input the model was built for: pixels for a
            pixel-space model, latent pixels for a latent one (SiT-XL/2 at 256px: 32).
        patch_size: side of a patch (SiT-XL/2: 2).
        in_channels: channels of x (1 for grey pixels, 4 for SD-VAE latents).
        num_layers, num_attention_heads, attention_head_dim: depth and width
            (hidden = heads * head_dim; SiT-XL/2: 28, 16, 72).
        num_classes: number of real classes; class index ``num_classes`` is the null class.
        learn_sigma: output ``2 * in_channels`` channels (official SiT checkpoints) and use
            the first ``in_channels`` as the velocity.
        mlp_ratio: feed-forward width over hidden (4 in SiT; must give an integer width).

    Call: ``model(x [B,C,H,W], timestep t [B] or 0-dim in [0,1], class_labels [B] long)`` ->
    output [B, out_channels, H, W]; :meth:`velocity_from_output` takes the velocity part.
    """

    _SIT_CONFIG_KEYS = (
        "sample_size", "patch_size", "in_channels", "num_layers", "num_attention_heads",
        "attention_head_dim", "num_classes", "learn_sigma", "mlp_ratio",
    )

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        mlp_ratio: float = 4.0,
    ):
        positive_int(sample_size, "sample_size")
        positive_int(patch_size, "patch_size")
        positive_int(in_channels, "in_channels")
        positive_int(num_layers, "num_layers")
        positive_int(num_attention_heads, "num_attention_heads")
        positive_int(attention_head_dim, "attention_head_dim")
        positive_int(num_classes, "num_classes")
        if sample_size % patch_size:
            raise UserError(f"`sample_size` ({sample_size}) must be a multiple of `patch_size` ({patch_size}).")
        hidden = num_attention_heads * attention_head_dim
        if hidden % 4:
            raise UserError(
                f"hidden size num_attention_heads * attention_head_dim = {hidden} must be a multiple of 4 "
                "(2-D sin-cos position embedding)."
            )
        if mlp_ratio * hidden != int(mlp_ratio * hidden):
            raise UserError(f"`mlp_ratio` ({mlp_ratio}) * hidden ({hidden}) must be an integer.")
        out_channels = 2 * in_channels if learn_sigma else in_channels
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=num_classes,
            norm_type="ada_norm_zero",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
        # DiT's __init__ registered its own keys too; keep the config to this class's signature
        # so that save_pretrained / from_pretrained round-trip without stray keys.
        kept = {k: v for k, v in self._internal_dict.items() if k in self._SIT_CONFIG_KEYS or k.startswith("_")}
        if "_use_default_values" in kept:
            kept["_use_default_values"] = [k for k in kept["_use_default_values"] if k in self._SIT_CONFIG_KEYS]
        self._internal_dict = type(self._internal_dict)(kept)
        ff_inner = int(mlp_ratio * hidden)
        for block in self.transformer_blocks:
            emb = block.norm1.emb
            emb.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0)
            emb.class_embedder.dropout_prob = 0.0  # the table keeps its null row (index num_classes)
            if ff_inner != 4 * hidden:
                _resize_feed_forward(block, hidden, ff_inner)

    # -- conventions ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def null_class(self) -> int:
        """The class index used for the unconditional branch of CFG."""
        return int(self.config.num_classes)

    def velocity_from_output(self, output: torch.Tensor) -> torch.Tensor:
        """[B, out_channels, H, W] -> the velocity [B, in_channels, H, W] (first half with learn_sigma)."""
        return output[:, : self.config.in_channels]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | None = None,
        class_labels: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ):
        """x [B, C, H, W], t paper time (0-dim, float or [B]), labels [B] in [0, num_classes]."""
        if hidden_states.dim() != 4:
            raise UserError(f"`hidden_states` must be [B, C, H, W]; got shape {tuple(hidden_states.shape)}.")
        b, c, h, w = hidden_states.shape
        size = self.config.sample_size
        if c != self.config.in_channels or h != size or w != size:
            raise UserError(
                f"`hidden_states` has shape {tuple(hidden_states.shape)} but this model was built for "
                f"[B, {self.config.in_channels}, {size}, {size}] (config in_channels / sample_size)."
            )
        if timestep is None:
            raise UserError("`timestep` (paper time t in [0, 1]) is required.")
        t = torch.as_tensor(timestep, device=hidden_states.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise UserError(f"`timestep` must be 0-dim or [B={b}]; got shape {tuple(t.shape)}.")
        if class_labels is None:
            raise UserError(
                f"`class_labels` [B] is required (use {self.null_class} for the unconditional branch)."
            )
        labels = torch.as_tensor(class_labels, device=hidden_states.device)
        if labels.shape != (b,) or labels.dtype not in (torch.int64, torch.int32):
            raise UserError(
                f"`class_labels` must be an integer tensor [B={b}]; got {labels.dtype} {tuple(labels.shape)}."
            )
        if not torch.compiler.is_compiling() and (labels.min() < 0 or labels.max() > self.null_class):
            raise UserError(
                f"`class_labels` must lie in [0, {self.num_classes}) (or {self.null_class} = null class); "
                f"got {labels.tolist()}."
            )
        return super().forward(
            hidden_states,
            timestep=t.float(),
            class_labels=labels.long(),
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=return_dict,
        )


def _resize_feed_forward(block: torch.nn.Module, hidden: int, inner: int) -> None:
    """Rebuild a block's GELU-tanh MLP with a non-default width (mlp_ratio != 4)."""
    proj_in = block.ff.net[0].proj
    block.ff.net[0].proj = torch.nn.Linear(hidden, inner, bias=proj_in.bias is not None)
    block.ff.net[2] = torch.nn.Linear(inner, hidden, bias=block.ff.net[2].bias is not None)
