"""The interface between the trainer and a model family.

A :class:`FlowModelAdapter` wraps one diffusers pipeline. It owns every convention of its
family (sigma vs t, the velocity's sign, packing, text or class conditioning, the VAE) and
exposes the flow in paper time (t = 0 noise, t = 1 data) to the method-agnostic core. The
trainer never touches a model except through this class.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any, Sequence

import torch

from ..errors import UserError
from ..flow import ConditionedFlow
from . import lora as _lora
from .lora import LoraSettings


class FlowModelAdapter(abc.ABC):
    """One model family, bound to a loaded pipeline.

    Attributes:
        pipeline: the diffusers pipeline (stock class or our subclass).
        transformer: the module LoRA is added to (``pipeline.transformer``).
        conditioning: ``"text"`` (prompts are strings) or ``"class"`` (integer labels).
    """

    pipeline: Any
    options: tuple[str, ...] = ()
    """Keyword options of the constructor / ``from_pretrained`` (``offload_text_encoder``, ...)."""
    conditioning: str = "text"
    quantizable: bool = False
    """Whether ``from_pretrained`` takes ``quantize_base`` (bitsandbytes NF4 / int8 base, :mod:`.quantize`)."""
    default_num_inference_steps: int = 20
    default_resolution: int = 256

    # -- loading --------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, *, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> "FlowModelAdapter":
        """Load through the pipeline's ``from_pretrained`` (a local folder or a Hub id) in ``dtype``
        (default fp32; ``torch_dtype=`` is the deprecated spelling)."""

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """ValueError in one line when ``options`` names one this family does not take."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            takes = f"it takes {', '.join(cls.options)}" if cls.options else "it takes none"
            raise UserError(
                f"{', '.join(f'`--{name}`' for name in unknown)} does not apply to {cls.__name__} ({takes}): drop it."
            )

    @classmethod
    def from_pipeline(cls, pipeline: Any, **options: Any) -> "FlowModelAdapter":
        """Wrap an already loaded pipeline of this family (as is: its dtype, device, quantization and
        offloading stay the user's); ``options`` are the family's constructor options
        (:attr:`options`). Every pipeline module is frozen; ``add_lora`` makes the LoRA trainable."""
        cls.check_options(options)
        model = cls(pipeline, **options)
        for module in getattr(pipeline, "components", {}).values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        return model

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    def to(self, device: torch.device | str) -> "FlowModelAdapter":
        self.pipeline.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # -- LoRA (the "adapter"; written once in :mod:`diffusers_am.models.lora`) ----------------
    @abc.abstractmethod
    def default_lora_targets(self) -> list[str]:
        """The family's default LoRA target module names (PEFT suffix semantics)."""

    @classmethod
    @abc.abstractmethod
    def lora_pipeline_class(cls) -> type:
        """The pipeline class whose ``save_lora_weights`` / ``load_lora_weights`` this family uses."""

    @property
    def has_lora(self) -> bool:
        """Whether the transformer holds a LoRA (added or loaded)."""
        return _lora.has_lora(self.transformer)

    def add_lora(self, settings: LoraSettings | Any) -> list[torch.nn.Parameter]:
        """Add a trainable LoRA (``LoraSettings`` or a ``peft.LoraConfig``) to ``transformer``; freeze
        everything else; return the trainable parameters (fp32). ValueError naming a bad rank, a target
        that matches no module, or an existing LoRA."""
        if self.has_lora:
            raise UserError("the transformer already has a LoRA adapter: load a fresh pipeline to add another.")
        config = _lora.lora_config(settings, self.default_lora_targets(), self.transformer)
        return _lora.add_lora(self.transformer, config)

    def save_lora(self, save_directory: str, **kwargs: Any) -> None:
        """Write ``pytorch_lora_weights.safetensors`` (diffusers format, adapter metadata) with the
        pipeline class's ``save_lora_weights``, loadable by ``pipe.load_lora_weights``."""
        _lora.save_lora(self.lora_pipeline_class(), self.transformer, save_directory, **kwargs)

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Run the base model: LoRA off inside the block, back on (and trainable) after it; a no-op
        while the transformer has no LoRA."""
        if not self.has_lora:
            yield
            return
        model = self.transformer
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()

    # -- sampling geometry ----------------------------------------------------------------
    @abc.abstractmethod
    def time_grid(self, num_inference_steps: int, resolution: int) -> torch.Tensor:
        """[N+1] increasing paper times t_0 .. t_N (t_N = 1), the family's own schedule
        converted (e.g. t = 1 - sigma for FlowMatch pipelines), fp32 on ``device``."""

    @abc.abstractmethod
    def initial_noise(self, batch_size: int, resolution: int, generator: torch.Generator | None) -> torch.Tensor:
        """[B, ...] fp32 X_0 ~ N(0, I) in the state space the velocities act on."""

    # -- conditioning ---------------------------------------------------------------------
    @abc.abstractmethod
    def encode_conditions(self, conditions: Sequence[Any]) -> Any:
        """Encode prompts (or class labels) once per batch; the result is cached by the caller
        and passed to :meth:`flow`. Text encoders may be offloaded after this."""

    @abc.abstractmethod
    def flow(self, encoded: Any, *, guidance_scale: float | None = None, train_module: torch.nn.Module | None = None) -> ConditionedFlow:
        """The paper-time flow for one encoded batch. ``train_module`` is the transformer as
        wrapped by the trainer (e.g. DDP); the fine-tuned velocity runs through it, the base
        velocity through the unwrapped ``transformer`` with adapters disabled."""

    # -- pixels ---------------------------------------------------------------------------
    @abc.abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable map from terminal states [B, ...] to images [B, C, H, W] in [0, 1]."""
