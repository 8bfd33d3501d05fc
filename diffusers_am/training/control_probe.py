"""The trainer's probes of the optimal control: the adaptive window and the matched lambda.

* ``--truncate_steps auto``: before update 0 and every ``--truncate_refresh_steps`` updates, one
  full-trajectory probe (:func:`diffusers_am.probe.probe_control_profile`) of the current fine-tuned flow
  measures the per-step control energy; :class:`diffusers_am.truncation.AdaptiveTruncation` folds it in and
  picks K, the smallest terminal window holding ``--truncate_share`` of it.
* ``--match_reward_scale velocity|reward_gain``: at set-up (LoRA still zero, so the flow is the base), a
  probe of ``--match_probe_batches`` batches gives the lambda at which this method asks for the control
  size 2nd-order ODE-AM asks for at ``--reward_scale`` (:func:`diffusers_am.calibration.matched_reward_scale`).

Every process probes the same batches (seeded by the run's seed and the update, not the process) and the
main process's numbers are broadcast, so every process trains with the same K and lambda. A probe draws
its prompts and noise from their own seeds and leaves the training RNG alone: a run without these
options is unchanged, and a resumed run probes what a straight run would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..calibration import matched_reward_scale
from ..probe import ControlProfile, probe_control_profile
from ..schedules import get_schedule
from ..truncation import AdaptiveTruncation
from .context import RunContext
from .data import PromptSampler, derive_seed
from .methods import get_method

_PER_SAMPLE = ("adjoint_norms", "learned_norms", "learned_dot_adjoint")


def adaptive_truncation(config: Any, num_steps: int) -> AdaptiveTruncation | None:
    """The run's :class:`AdaptiveTruncation` for ``--truncate_steps auto`` (None for a fixed K)."""
    if config.truncate_steps != "auto":
        return None
    return AdaptiveTruncation(
        num_steps,
        share=config.truncate_share,
        min_steps=config.truncate_min_steps,
        max_steps=config.truncate_max_steps,
        refresh_every=config.truncate_refresh_steps,
        smoothing=config.truncate_smoothing,
    )


def probe_batch(ctx: RunContext, step: int, index: int, *, sde: bool, reward_scale: float) -> ControlProfile:
    """Probe one batch of ``train_batch_size`` drawn for (``step``, ``index``) with the current flow.

    ``sde``: integrate the method's SDE (``--sde_schedule``, refined grid) instead of the ODE."""
    cfg, model = ctx.config, ctx.adapter
    batch = PromptSampler(ctx.prompts, derive_seed(cfg.seed, "probe")).batch(step, cfg.train_batch_size, index)
    noise_gen = torch.Generator(device=model.device).manual_seed(derive_seed(cfg.seed, "probe-noise", step, index))
    noise = model.initial_noise(cfg.train_batch_size, ctx.resolution, noise_gen)
    sde_gen = torch.Generator(device=model.device).manual_seed(derive_seed(cfg.seed, "probe-sde", step, index))
    schedule = get_schedule(cfg.sde_schedule, t_min=cfg.sde_t_min) if sde else None
    model.transformer.eval()  # no LoRA dropout in a measurement; the loop sets train() before an update
    flow = model.flow(model.encode_conditions(batch), guidance_scale=cfg.guidance_scale, train_module=ctx.train_module)

    def reward_fn(x: torch.Tensor) -> torch.Tensor:
        return ctx.reward(model.decode(x), batch)

    with ctx.accelerator.autocast():
        return probe_control_profile(
            flow, noise, ctx.times, reward_fn, order=cfg.reg_order, reward_scale=reward_scale, schedule=schedule,
            generator=sde_gen,
        )


def concat_profiles(profiles: list[ControlProfile]) -> ControlProfile:
    """One profile over the batches of ``profiles`` (same grid and lambda): per-sample tensors concatenated."""
    first = profiles[0]
    changes = {}
    for name in _PER_SAMPLE:
        values = [getattr(p, name) for p in profiles]
        changes[name] = None if values[0] is None else torch.cat(values, dim=1)
    if first.reward is not None:
        changes["reward"] = torch.cat([p.reward for p in profiles])
    return dataclasses.replace(first, **changes)


def _broadcast(ctx: RunContext, value: Any) -> Any:
    """The main process's ``value`` on every process."""
    if ctx.accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def refresh_window(ctx: RunContext, truncation: AdaptiveTruncation, step: int) -> dict[str, Any] | None:
    """Probe before update ``step`` (0-based) when due and re-pick K; returns the probe's log record (the K
    chosen, its energy share per step and the probe's intensity profile), None when no probe was due."""
    if not truncation.due(step):
        return None
    sde = get_method(ctx.config.method).control == "sde"
    profile = probe_batch(ctx, step, 0, sde=sde, reward_scale=ctx.reward_scale)
    energy = _broadcast(ctx, profile.energy_per_step())
    k = truncation.update(energy, step)
    return {"truncate_steps": k, **profile.to_log()}


def match_reward_scale(ctx: RunContext, truncation: AdaptiveTruncation | None) -> tuple[float, dict[str, Any]]:
    """(lambda for this run, what was measured) under ``--match_reward_scale``: this method's target control
    over its window matches 2nd-order ODE-AM's at ``--reward_scale`` over the same window, at set-up.

    With ``--truncate_steps auto`` the first window is picked from the same probe (K does not depend on
    lambda), so the first refresh probe is this one."""
    cfg = ctx.config
    batches = range(cfg.match_probe_batches)
    ode = concat_profiles([probe_batch(ctx, 0, i, sde=False, reward_scale=cfg.reward_scale) for i in batches])
    if get_method(cfg.method).control == "sde":
        target = concat_profiles([probe_batch(ctx, 0, i, sde=True, reward_scale=cfg.reward_scale) for i in batches])
    else:
        target = ode.with_order(cfg.reg_order)
    if truncation is not None:
        truncation.update(_broadcast(ctx, target.energy_per_step()), 0)
        k = truncation.steps
    else:
        k = ctx.k_steps
    lam = matched_reward_scale(
        ode.with_order(2.0), target, reference_scale=cfg.reward_scale, truncate_steps=k, statistic=cfg.match_reward_scale
    )
    lam = float(_broadcast(ctx, lam))
    info = {
        "reward_scale": lam,
        "reference_reward_scale": cfg.reward_scale,
        "statistic": cfg.match_reward_scale,
        "truncate_steps": k,
        "probe_samples": int(ode.adjoint_norms.shape[1]),
    }
    return lam, info
