"""The controlled-velocity step shared by our pipeline subclasses.

Inside the control window (the last K of N steps, or all) each transformer call returns
    v = v_base + control_scale * (v_lora - v_base),
and outside it the base velocity v_base (LoRA disabled). The stock ``__call__`` runs unchanged:
a forward pre-hook / hook pair on the transformer switches the LoRA off (outside the window) or
mixes in a second, LoRA-free forward (inside it, when ``control_scale != 1``), and a step-end
callback counts steps and records the last K+1 latents (converted to the adapter's state
layout) for the adjoint. Linear in the prediction, so it commutes with CFG.

Without a LoRA adapter loaded (or one fused into the weights) the model is its own base and
the control settings change nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from ..errors import UserError


def check_control_window(control_window: int | str, num_steps: int | None = None) -> int | None:
    """``"all"`` -> None; an integer K in [1, N] -> K. ValueError otherwise."""
    if isinstance(control_window, str):
        if control_window != "all":
            raise UserError(f"`control_window` must be 'all' or an integer K (the last K steps); got {control_window!r}.")
        return None
    if isinstance(control_window, bool) or int(control_window) != control_window or control_window < 1:
        raise UserError(f"`control_window` must be 'all' or a positive integer K; got {control_window!r}.")
    if num_steps is not None and control_window > num_steps:
        raise UserError(
            f"`control_window` K={control_window} is larger than num_inference_steps={num_steps}; use K <= {num_steps} or 'all'."
        )
    return int(control_window)


def check_record(record_last_k: int | None, num_steps: int | None = None) -> int | None:
    if record_last_k is None:
        return None
    if isinstance(record_last_k, bool) or int(record_last_k) != record_last_k or record_last_k < 1:
        raise UserError(f"`record_last_k` must be None or a positive integer K; got {record_last_k!r}.")
    if num_steps is not None and record_last_k > num_steps:
        raise UserError(
            f"`record_last_k` K={record_last_k} is larger than num_inference_steps={num_steps}; use K <= {num_steps}."
        )
    return int(record_last_k)


class _ControlState:
    def __init__(self, scale: float, window: int | None, record: int | None):
        self.scale, self.window, self.record = scale, window, record
        self.step = 0
        self.states: list[torch.Tensor] = []
        self.disabled = False
        self.inner = False


class ControlledVelocityMixin:
    """Mixed in before a stock FlowMatch pipeline class. A subclass sets ``output_class`` and
    implements ``_am_state(latents) -> [B, C, h, w]`` (the adapter's state layout) and records
    the initial latents by calling ``self._am_record(latents)`` from ``prepare_latents``."""

    output_class: type

    def _am_state(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _am_record(self, latents: torch.Tensor) -> None:
        ctl = getattr(self, "_am_ctl", None)
        if ctl is not None and ctl.record is not None:
            ctl.states.append(self._am_state(latents).detach().clone())

    # -- hooks ----------------------------------------------------------------------------
    def _am_lora_active(self) -> bool:
        return bool(getattr(self.transformer, "_hf_peft_config_loaded", False))

    def _am_in_window(self, ctl: _ControlState) -> bool:
        n = len(self.scheduler.timesteps)
        if ctl.window is not None and ctl.window > n:
            raise UserError(f"`control_window` K={ctl.window} is larger than num_inference_steps={n}.")
        return ctl.window is None or ctl.step >= n - ctl.window

    def _am_pre_hook(self, module, args, kwargs):
        ctl = self._am_ctl
        if ctl.inner or not self._am_lora_active():
            return None
        if not self._am_in_window(ctl):
            module.disable_adapters()
            ctl.disabled = True
        return None

    def _am_post_hook(self, module, args, kwargs, output):
        ctl = self._am_ctl
        if ctl.inner:
            return output
        if ctl.disabled:
            module.enable_adapters()
            ctl.disabled = False
            return output
        if not self._am_lora_active() or ctl.scale == 1.0:
            return output
        ctl.inner = True
        module.disable_adapters()
        try:
            base = module(*args, **kwargs)
        finally:
            module.enable_adapters()
            ctl.inner = False
        if isinstance(output, tuple):
            return (base[0] + ctl.scale * (output[0] - base[0]),) + tuple(output[1:])
        output.sample = base.sample + ctl.scale * (output.sample - base.sample)
        return output

    # -- call -----------------------------------------------------------------------------
    def __call__(
        self,
        *args: Any,
        control_scale: float = 1.0,
        control_window: int | str = "all",
        record_last_k: int | None = None,
        **kwargs: Any,
    ):
        """The stock ``__call__`` (every stock argument) plus:

        Args:
            control_scale: s in v = v_base + s (v_lora - v_base) inside the window (1: the LoRA model).
            control_window: ``"all"`` or K: control only the last K steps, base velocity before.
            record_last_k: K: also return ``states`` [K+1, B, C, h, w] (the adapter's state
                layout, last K+1 latents X_{N-K} .. X_N) and ``times`` [K+1] (paper times 1 - sigma).
        """
        scale = float(control_scale)
        if not scale == scale:
            raise UserError(f"`control_scale` must be a finite number; got {control_scale!r}.")
        steps = kwargs.get("num_inference_steps")
        if kwargs.get("sigmas") is not None:
            steps = len(kwargs["sigmas"])
        window = check_control_window(control_window, steps)
        record = check_record(record_last_k, steps)
        ctl = _ControlState(scale, window, record)

        user_callback = kwargs.pop("callback_on_step_end", None)
        tensor_inputs = list(kwargs.pop("callback_on_step_end_tensor_inputs", None) or ["latents"])
        tensor_inputs += [k for k in getattr(user_callback, "tensor_inputs", []) if k not in tensor_inputs]
        if "latents" not in tensor_inputs:
            tensor_inputs.append("latents")

        def on_step_end(pipe, i, t, callback_kwargs):
            out = user_callback(pipe, i, t, callback_kwargs) if user_callback is not None else {}
            latents = (out or {}).get("latents", callback_kwargs["latents"])
            ctl.step = i + 1
            if record is not None:
                ctl.states.append(self._am_state(latents).detach().clone())
                del ctl.states[: -(record + 1)]
            return out if out is not None else {}

        self._am_ctl = ctl
        handles = [
            self.transformer.register_forward_pre_hook(self._am_pre_hook, with_kwargs=True),
            self.transformer.register_forward_hook(self._am_post_hook, with_kwargs=True),
        ]
        try:
            result = super().__call__(
                *args, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=tensor_inputs, **kwargs
            )
        finally:
            for handle in handles:
                handle.remove()
            if ctl.disabled:
                self.transformer.enable_adapters()
            self._am_ctl = None
        if record is None:
            return result
        n = len(self.scheduler.timesteps)
        check_record(record, n)
        states = torch.stack(ctl.states[-(record + 1) :])
        times = (1.0 - self.scheduler.sigmas[n - record :].double()).float()
        if isinstance(result, tuple):
            return result + (states, times)
        return self.output_class(**{**result, "states": states, "times": times})
