"""SiTPipeline: class-conditional flow sampling with a SiT-style transformer, in paper time.

Components: ``transformer`` (:class:`SiTTransformer2DModel`), ``vae`` (``AutoencoderKL`` for a
latent model such as SiT-XL/2 on SD-VAE latents, or ``None`` for a pixel-space model) and an
optional ``scheduler`` (``FlowMatchEulerDiscreteScheduler``).

Sampling is an Euler loop in paper time (t: 0 noise -> 1 data; SiT's own convention, the
transformer predicts ``x_data - noise``): ``x <- x + (t_{k+1} - t_k) * v(x, t_k)``. The grid is
uniform ``linspace(0, 1, N + 1)``; with a scheduler it is ``t = 1 - scheduler.sigmas`` (the
sigmas set from ``linspace(1, 1/N, N)`` plus the terminal 0, so its ``shift`` warps the grid
and shift 1 gives the uniform grid).
States are fp32; the transformer runs in its own dtype.

Step count vs the official SiT sampler (github.com/willisma/SiT, ``sample.py ODE``): its
``--num-sampling-steps M`` is the number of *points* of ``linspace(0, 1, M)``, so
``--sampling-method euler --num-sampling-steps M`` takes M - 1 Euler steps and equals
``num_inference_steps = M - 1`` here (no scheduler). Its default, adaptive ``dopri5``, has no
fixed-step counterpart here.

Pixel-space models work on x in [-1, 1] (images = x / 2 + 1/2); latent models decode
``vae.decode(x / scaling_factor (+ shift_factor))`` and map [-1, 1] to [0, 1] the same way.

CFG (``guidance_scale > 1``) runs the labels and the null class ``num_classes`` in one batch
and returns ``v_null + s * (v_cond - v_null)`` on the first ``guidance_channels`` channels
(config entry; None, the default: every channel, the standard form) and the conditional
velocity ``v_cond`` on the others. SiT's official ``forward_with_cfg`` guides the first 3 of
SD-VAE's 4 latent channels "for exact reproducibility": ``convert_sit_checkpoint`` writes
``guidance_channels=3`` for such checkpoints, so a converted SiT-XL/2 samples as the official
code does. The choice lives in ``model_index.json``; override it with
``SiTPipeline.from_pretrained(folder, guidance_channels=None)``.

With a LoRA loaded, ``control_scale`` and ``control_start`` sample with the control
``u = v_lora - v_base`` scaled and restricted to ``t >= control_start`` (base model before it):
the inference-time view of a control trained on a truncated window.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..errors import UserError
from ..checks import finite_float, one_of, positive_int
from ..deprecation import warn_deprecated
from .sit_transformer import SiTTransformer2DModel
from .controlled import check_control_window

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class SiTLoraLoaderMixin(SanaLoraLoaderMixin):
    """LoRA load/save for a pipeline whose only LoRA-able module is ``transformer``.

    Diffusers' single-transformer loader (PEFT format, ``transformer.`` key prefix, adapter
    metadata in the safetensors header) fits a :class:`SiTTransformer2DModel` unchanged."""

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"


class SiTPipeline(DiffusionPipeline, SiTLoraLoaderMixin):
    """Class-conditional flow pipeline for SiT-style transformers (pixel or latent space).

    Args:
        transformer: the velocity model.
        vae: ``AutoencoderKL`` for latent models, ``None`` for pixel space.
        scheduler: optional ``FlowMatchEulerDiscreteScheduler`` defining the time grid.
        default_num_inference_steps: steps used when ``__call__`` gets none (stored in
            ``model_index.json``; 50 for SiT-XL/2).
        guidance_channels: CFG guides the first this many state channels and keeps the
            conditional velocity on the rest (stored in ``model_index.json``); None (default):
            all channels; 3 reproduces the official SiT ``forward_with_cfg`` on 4-channel latents.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae", "scheduler"]

    def __init__(
        self,
        transformer: SiTTransformer2DModel,
        vae: Any = None,
        scheduler: Any = None,
        default_num_inference_steps: int = 50,
        guidance_channels: int | None = None,
    ):
        super().__init__()
        if not isinstance(transformer, SiTTransformer2DModel):
            raise UserError(f"`transformer` must be a SiTTransformer2DModel; got {type(transformer).__name__}.")
        if vae is not None and getattr(vae.config, "latent_channels", None) != transformer.config.in_channels:
            raise UserError(
                f"`vae` has latent_channels={getattr(vae.config, 'latent_channels', None)} but the transformer "
                f"takes in_channels={transformer.config.in_channels}."
            )
        if scheduler is not None and (
            not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or scheduler.config.use_dynamic_shifting
        ):
            raise UserError(
                "`scheduler` must be None (uniform paper-time grid) or a FlowMatchEulerDiscreteScheduler with "
                f"a fixed shift (use_dynamic_shifting=False); got {type(scheduler).__name__}."
            )
        positive_int(default_num_inference_steps, "default_num_inference_steps")
        channels = transformer.config.in_channels
        if guidance_channels is not None and (
            isinstance(guidance_channels, bool)
            or not isinstance(guidance_channels, (int, np.integer))
            or not 1 <= int(guidance_channels) <= channels
        ):
            raise UserError(
                f"`guidance_channels` must be None (guide every channel) or an integer in [1, {channels}] "
                f"(the transformer's in_channels); got {guidance_channels!r}."
            )
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)
        self.register_to_config(
            default_num_inference_steps=int(default_num_inference_steps),
            guidance_channels=None if guidance_channels is None else int(guidance_channels),
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # -- geometry -------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    @property
    def resolution(self) -> int:
        """Image side in pixels: transformer sample_size times the VAE's downsampling."""
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def num_classes(self) -> int:
        return self.transformer.num_classes

    def check_resolution(self, height: int | None, width: int | None, name: str = "height/width") -> int:
        """The model's only resolution; ValueError for any other requested size."""
        res = self.resolution
        for value in (height, width):
            if value is not None and int(value) != res:
                raise UserError(
                    f"`{name}` = {value} but this model was built for {res}x{res} images "
                    f"(sample_size {self.transformer.config.sample_size} x VAE factor {self.vae_scale_factor}); "
                    f"pass {res} or leave it unset."
                )
        return res

    def check_class_labels(self, class_labels: int | Sequence[int] | torch.Tensor, device=None) -> torch.Tensor:
        """Labels as a LongTensor [B]; ValueError for non-integers or labels outside [0, num_classes)."""
        if isinstance(class_labels, bool):
            raise UserError(f"`class_labels` must be integers in [0, {self.num_classes}); got {class_labels!r}.")
        if isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = torch.as_tensor(class_labels)
        if labels.dim() != 1 or labels.numel() == 0:
            raise UserError(
                f"`class_labels` must be a non-empty 1-D list of integers; got shape {tuple(labels.shape)}."
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise UserError(f"`class_labels` must be integers in [0, {self.num_classes}); got dtype {labels.dtype}.")
        bad = [int(v) for v in labels.tolist() if not 0 <= int(v) < self.num_classes]
        if bad:
            raise UserError(
                f"`class_labels` must lie in [0, {self.num_classes}) for this model; got {bad}."
            )
        return labels.long().to(device if device is not None else self._execution_device)

    def time_grid(self, num_inference_steps: int, device=None) -> torch.Tensor:
        """[N+1] increasing paper times from 0 to 1 (fp32)."""
        n = positive_int(num_inference_steps, "num_inference_steps")
        device = device if device is not None else self._execution_device
        scheduler = getattr(self, "scheduler", None)
        if scheduler is None:
            return torch.linspace(0.0, 1.0, n + 1, device=device, dtype=torch.float32)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n).tolist(), device=device)
        times = 1.0 - scheduler.sigmas.to(device=device, dtype=torch.float32)
        return times.clamp(0.0, 1.0)

    # -- the model ------------------------------------------------------------------------
    def predict_velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor,
        guidance_scale: float = 1.0,
        model: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Paper-time velocity [B, C, h, w] fp32 at states x [B, C, h, w] and time t (0-dim or float).

        ``guidance_scale > 1`` batches the null class and returns :meth:`guide` of the two
        velocities. ``model`` defaults to ``self.transformer`` (pass a wrapped one, e.g. DDP, to
        train through it)."""
        model = model if model is not None else self.transformer
        dtype = self.transformer.dtype
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if guidance_scale > 1.0:
            null = torch.full_like(class_labels, self.transformer.null_class)
            out = model(
                torch.cat([x, x]).to(dtype), timestep=t, class_labels=torch.cat([class_labels, null]), return_dict=False
            )[0]
            v_cond, v_null = self.transformer.velocity_from_output(out).float().chunk(2)
            return self.guide(v_cond, v_null, guidance_scale)
        out = model(x.to(dtype), timestep=t, class_labels=class_labels, return_dict=False)[0]
        return self.transformer.velocity_from_output(out).float()

    def guide(self, v_cond: torch.Tensor, v_null: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """CFG of velocities [B, C, h, w]: ``v_null + s * (v_cond - v_null)`` on the first
        ``config.guidance_channels`` channels (all when None), ``v_cond`` on the others."""
        guided = v_null + guidance_scale * (v_cond - v_null)
        k = self.config.get("guidance_channels")
        if k is None or k >= guided.shape[1]:
            return guided
        return torch.cat([guided[:, :k], v_cond[:, k:]], dim=1)

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    def controlled_velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        class_labels: torch.Tensor,
        guidance_scale: float = 1.0,
        control_scale: float = 1.0,
        control_start: float = 0.0,
    ) -> torch.Tensor:
        """``v_base + control_scale * (v_lora - v_base)`` for ``t >= control_start``, else ``v_base``.

        Scale 1 from t = 0 is the plain LoRA model (one forward); otherwise the base velocity comes
        from a pass with adapters disabled."""
        if not self.has_lora or (control_scale == 1.0 and float(t) >= control_start):
            return self.predict_velocity(x, t, class_labels, guidance_scale)
        self.transformer.disable_adapters()
        try:
            base = self.predict_velocity(x, t, class_labels, guidance_scale)
        finally:
            self.transformer.enable_adapters()
        if float(t) < control_start or control_scale == 0.0:
            return base
        tuned = self.predict_velocity(x, t, class_labels, guidance_scale)
        return base + control_scale * (tuned - base)

    def prepare_latents(self, batch_size: int, generator=None, device=None) -> torch.Tensor:
        """X_0 ~ N(0, I): [B, in_channels, sample_size, sample_size] fp32."""
        cfg = self.transformer.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        device = device if device is not None else self._execution_device
        return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)

    def decode_states(self, x: torch.Tensor) -> torch.Tensor:
        """Terminal states [B, C, h, w] -> images in [-1, 1] (unclamped) [B, C_img, H, W]; differentiable."""
        vae = getattr(self, "vae", None)
        if vae is None:
            return x
        z = x / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            z = z + shift
        return vae.decode(z.to(vae.dtype), return_dict=False)[0].float()

    # -- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        control_scale: float = 1.0,
        control_window: int | str = "all",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        control_start: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per class label.

        Args:
            class_labels: integers in [0, num_classes).
            num_inference_steps: Euler steps (default: ``config.default_num_inference_steps``);
                the official SiT ``--sampling-method euler --num-sampling-steps M`` is M - 1 steps.
            guidance_scale: CFG scale; 1 (default) runs the conditional model only; guides the
                first ``config.guidance_channels`` channels (all when None).
            generator: for the initial noise.
            latents: optional initial states X_0 [B, C, h, w] (default: fresh noise).
            height, width: must equal :attr:`resolution` when given.
            output_type: "pil", "np" ([B, H, W, C] in [0, 1]), "pt" ([B, C, H, W] in [0, 1]) or
                "latent" (terminal states).
            control_scale, control_window: with a LoRA loaded, scale the control v_lora - v_base and
                apply it only on the last ``control_window`` = K of the N steps ("all": every step), as
                the FLUX / SD3 controlled pipelines (defaults: the plain LoRA model).
            callback_on_step_end: ``f(pipe, step, t, callback_kwargs) -> dict`` after each step, as in
                diffusers pipelines; ``callback_kwargs`` holds ``callback_on_step_end_tensor_inputs``
                (default ``["latents"]``: the state after the step); a returned ``"latents"`` replaces it.
            control_start: deprecated (FutureWarning): the paper time the control starts at; on the
                uniform grid ``control_start = (N - K) / N`` is ``control_window = K``.
        """
        one_of(output_type, "output_type", OUTPUT_TYPES)
        if not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale) or guidance_scale < 0:
            raise UserError(f"`guidance_scale` must be a finite number >= 0; got {guidance_scale!r}.")
        self.check_resolution(height, width)
        if control_start is not None:
            warn_deprecated("control_start", "control_window")
            if control_window != "all":
                raise UserError("pass either `control_window` or `control_start` (deprecated), not both.")
        for name, value in (("control_scale", control_scale), ("control_start", control_start or 0.0)):
            finite_float(value, name)
        if control_start is not None and not 0.0 <= control_start <= 1.0:
            raise UserError(f"`control_start` is a paper time in [0, 1]; got {control_start}.")
        tensor_inputs = self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        labels = self.check_class_labels(class_labels, device)
        if num_inference_steps is None:
            num_inference_steps = self.config.default_num_inference_steps
        window = check_control_window(control_window, positive_int(num_inference_steps, "num_inference_steps"))
        if (control_scale != 1.0 or (control_start or 0.0) > 0.0 or window is not None) and not self.has_lora:
            raise UserError(
                "`control_scale` / `control_window` / `control_start` need a LoRA: call `load_lora_weights` first."
            )
        times = self.time_grid(num_inference_steps, device)
        if latents is None:
            x = self.prepare_latents(labels.shape[0], generator, device)
        else:
            cfg = self.transformer.config
            expected = (labels.shape[0], cfg.in_channels, cfg.sample_size, cfg.sample_size)
            if tuple(latents.shape) != tuple(expected):
                raise UserError(f"`latents` must have shape {tuple(expected)}; got {tuple(latents.shape)}.")
            x = latents.to(device=device, dtype=torch.float32)

        n = len(times) - 1
        for k in self.progress_bar(range(n)):
            active = (window is None or k >= n - window) and (control_start is None or float(times[k]) >= control_start)
            v = self.controlled_velocity(x, times[k], labels, guidance_scale, control_scale if active else 0.0)
            x = x + (times[k + 1] - times[k]) * v
            if callback_on_step_end is not None:
                local = {"latents": x}
                out = callback_on_step_end(self, k, times[k], {name: local[name] for name in tensor_inputs}) or {}
                x = out.pop("latents", x)

        if output_type == "latent":
            image = x
        else:
            image = self.decode_states(x)
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)


    _callback_tensor_inputs = ["latents"]

    def _check_callback(self, callback: Callable | None, tensor_inputs: list[str] | None) -> list[str]:
        """The tensor names handed to ``callback_on_step_end`` (a diffusers ``PipelineCallback`` brings
        its own); ValueError naming an unknown one or a non-callable callback."""
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        if callback is None:
            return []
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        elif not callable(callback):
            raise UserError(f"`callback_on_step_end` must be callable; got {type(callback).__name__}.")
        names = list(tensor_inputs) if tensor_inputs is not None else ["latents"]
        bad = [name for name in names if name not in self._callback_tensor_inputs]
        if bad:
            raise UserError(
                f"`callback_on_step_end_tensor_inputs` {bad} not among {self._callback_tensor_inputs}."
            )
        return names

