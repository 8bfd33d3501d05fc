"""Checks shared by the FLUX.1 and SD3 tests: an adapter against its stock pipeline (tiny, offline)."""

from __future__ import annotations

import pytest
import torch
from _tiny_pipelines import TINY_RESOLUTION as RES

from diffusers_am.flow import sample_euler
from diffusers_am.models import LoraSettings, load_model_adapter
from diffusers_am.objectives import ode_am_step

N = 4
PROMPTS = ["a red cat", "a dog"]
SEQ = 16  # max_sequence_length of the tiny text encoders
TOL = 1e-5  # fp32 CPU, same operations: rounding differences only


def stock_call_kwargs(guidance_scale: float, /, **over) -> dict:
    """The stock pipeline's call on :data:`PROMPTS` at the tiny resolution, N steps, tensors out, at
    ``guidance_scale`` unless ``over`` (which replaces any entry) says otherwise."""
    kw = dict(prompt=PROMPTS, height=RES, width=RES, num_inference_steps=N, output_type="pt", max_sequence_length=SEQ,
              guidance_scale=guidance_scale)
    kw.update(over)
    return kw


def adapter_with_random_lora(directory, out_dir):
    """(model adapter of the pipeline folder ``directory``, its LoRA parameters, ``out_dir``): a random LoRA
    added by :func:`add_random_lora` and saved to ``out_dir``."""
    adapter = load_model_adapter(directory, max_sequence_length=SEQ)
    return adapter, add_random_lora(adapter, out_dir), out_dir


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def adapter_trajectory(adapter, velocity: str = "velocity", guidance_scale=None, window=None, scale=1.0):
    """Euler in paper time from the pipeline's noise draw; the controlled velocity inside the last
    ``window`` steps (None: all), the base velocity before. Returns (states [N+1, ...], images)."""
    flow = adapter.flow(adapter.encode_conditions(PROMPTS), guidance_scale=guidance_scale)
    times = adapter.time_grid(N, RES)
    x = adapter.initial_noise(len(PROMPTS), RES, gen())
    if window is None and scale == 1.0:
        states = sample_euler(getattr(flow, velocity), x, times, record_last=N + 1)
        return states, adapter.decode(states[-1])
    states = [x]
    with torch.no_grad():
        for i in range(N):
            b = flow.base_velocity(x, times[i])
            inside = window is None or i >= N - window
            v = b + scale * (flow.velocity(x, times[i]) - b) if inside else b
            x = x + (times[i + 1] - times[i]) * v
            states.append(x)
    return torch.stack(states), adapter.decode(x)


def check_time_grid(adapter, stock, call_kwargs):
    stock(generator=gen(), **call_kwargs)
    times = adapter.time_grid(N, RES)
    torch.testing.assert_close(times, 1 - stock.scheduler.sigmas.float(), atol=1e-7, rtol=0)
    assert times[0] == 0 and times[-1] == 1 and (times[1:] > times[:-1]).all()


def check_base_matches_stock(adapter, stock, call_kwargs, guidance_scale):
    images = adapter_trajectory(adapter, "base_velocity", guidance_scale=guidance_scale)[1]
    torch.testing.assert_close(images, stock(generator=gen(), **call_kwargs).images, atol=TOL, rtol=0)


def check_lora_round_trip(adapter, directory, lora_dir, stock_cls, controlled_cls, call_kwargs):
    """Random LoRA saved by the adapter: the stock pipeline loads it, its images differ from the
    base and equal the controlled pipeline's (scale 1, all steps) and the adapter's."""
    stock = stock_cls.from_pretrained(directory)
    base = stock(generator=gen(), **call_kwargs).images
    stock.load_lora_weights(str(lora_dir))
    tuned = stock(generator=gen(), **call_kwargs).images
    assert (tuned - base).abs().max() > 1e-3
    controlled = controlled_cls.from_pretrained(directory)
    controlled.load_lora_weights(str(lora_dir))
    out = controlled(generator=gen(), control_scale=1.0, control_window="all", **call_kwargs)
    torch.testing.assert_close(out.images, tuned, atol=TOL, rtol=0)
    torch.testing.assert_close(adapter_trajectory(adapter, guidance_scale=call_kwargs.get("guidance_scale"))[1], tuned, atol=TOL, rtol=0)
    return controlled


def check_window_and_recording(adapter, controlled, call_kwargs, k=2, scale=0.5):
    out = controlled(generator=gen(), control_window=k, control_scale=scale, record_last_k=N, **call_kwargs)
    states, images = adapter_trajectory(adapter, guidance_scale=call_kwargs.get("guidance_scale"), window=k, scale=scale)
    torch.testing.assert_close(out.states, states, atol=TOL, rtol=TOL)
    torch.testing.assert_close(out.times, adapter.time_grid(N, RES), atol=1e-7, rtol=0)
    torch.testing.assert_close(out.images, images, atol=TOL, rtol=0)


def check_ode_am_step(adapter, params, guidance_scale=None):
    """ODE-AM's loss and LoRA gradient equal tests/_ode_am_reference.py's (autograd, the adapter's own switch)."""
    from _ode_am_reference import ode_am_reference

    for p in params:
        p.grad = None
    flow = adapter.flow(adapter.encode_conditions(PROMPTS), guidance_scale=guidance_scale)
    noise, times = adapter.initial_noise(2, RES, gen(5)), adapter.time_grid(N, RES)

    def reward(x):
        return adapter.decode(x).mean(dim=(1, 2, 3))

    out = ode_am_step(flow, noise, times, reward, truncate_steps=2, reward_scale=10.0)
    assert out.reward.shape == (2,) and out.control_norm_per_step.shape == (2,)
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    loss, expected = ode_am_reference(adapter, flow, noise, times, reward, params, truncate_steps=2, reward_scale=10.0)
    assert out.loss == pytest.approx(loss, rel=1e-4)
    scale = max(float(g.abs().max()) for g in expected)
    assert scale > 0
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-4 * scale, rtol=1e-4)


def add_random_lora(adapter, out_dir):
    params = adapter.add_lora(LoraSettings(rank=4, init_lora_weights=False))
    assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
    adapter.save_lora(str(out_dir))
    return params
