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
from ..flow import check_truncation
from ..probe import ControlProfile, probe_control_profile
from ..prompts import PromptSampler, derive_seed
from ..schedules import get_schedule
from ..truncation import AdaptiveTruncation
from .context import RunContext
from .methods import Method

_PER_SAMPLE = ("adjoint_norms", "learned_norms", "learned_dot_adjoint")


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


class ControlProbes:
    """K and lambda as the run uses them, and the probes that set them.

    ``truncate_steps`` is the window K of the next update (the fixed ``--truncate_steps``, checked against
    N here, or the adaptive window); ``reward_scale`` the lambda the updates use (``--reward_scale``, or the
    matched lambda under ``--match_reward_scale``, whose reference is then ``config.reward_scale``).
    ``state_dict()`` / ``load_state_dict()`` carry both into a checkpoint, so a resumed run continues with
    what the straight run had instead of probing again."""

    def __init__(self, config: Any, num_steps: int, method: Method):
        self.config, self.method = config, method
        self.truncation: AdaptiveTruncation | None = None
        """The :class:`~diffusers_am.truncation.AdaptiveTruncation` of ``--truncate_steps auto``, else None."""
        if config.truncate_steps == "auto":
            self.truncation = AdaptiveTruncation(
                num_steps,
                share=config.truncate_share,
                min_steps=config.truncate_min_steps,
                max_steps=config.truncate_max_steps,
                refresh_every=config.truncate_refresh_steps,
                smoothing=config.truncate_smoothing,
            )
            self.truncate_steps = self.truncation.min_steps
        else:
            self.truncate_steps = check_truncation(config.truncate_steps, num_steps, "--truncate_steps")
        self.reward_scale: float = config.reward_scale
        self.match: dict[str, Any] | None = None
        """What ``--match_reward_scale`` measured at set-up (None when off or not measured yet)."""

    # -- the probes ------------------------------------------------------------------------------------
    def before_update(self, ctx: RunContext, step: int) -> dict[str, Any] | None:
        """``--truncate_steps auto``: probe before update ``step`` (0-based) when due and re-pick K; returns the
        probe's log record (the K chosen, its energy share per step and the probe's intensity profile), None
        when no probe was due (or K is fixed)."""
        if self.truncation is None or not self.truncation.due(step):
            return None
        profile = probe_batch(ctx, step, 0, sde=self.method.control == "sde", reward_scale=self.reward_scale)
        energy = _broadcast(ctx, profile.energy_per_step())
        self.truncate_steps = self.truncation.update(energy, step)
        return {"truncate_steps": self.truncate_steps, **profile.to_log()}

    @property
    def match_pending(self) -> bool:
        """Whether ``--match_reward_scale`` still has to measure lambda (on, and not restored from a checkpoint)."""
        return self.config.match_reward_scale != "none" and self.match is None

    def match_reward_scale(self, ctx: RunContext) -> None:
        """``--match_reward_scale``: measure the lambda at which this method's target control over its window
        matches 2nd-order ODE-AM's at the reference ``--reward_scale`` over the same window, at set-up (LoRA
        still zero); see :attr:`match_pending`.

        With ``--truncate_steps auto`` the first window is picked from the same probe (K does not depend on
        lambda), so the first refresh probe is this one."""
        cfg = self.config
        reference = cfg.reward_scale
        batches = range(cfg.match_probe_batches)
        ode = concat_profiles([probe_batch(ctx, 0, i, sde=False, reward_scale=reference) for i in batches])
        if self.method.control == "sde":
            target = concat_profiles([probe_batch(ctx, 0, i, sde=True, reward_scale=reference) for i in batches])
        else:
            target = ode.with_order(cfg.reg_order)
        if self.truncation is not None:
            self.truncation.update(_broadcast(ctx, target.energy_per_step()), 0)
            self.truncate_steps = self.truncation.steps
        k = self.truncate_steps
        lam = matched_reward_scale(
            ode.with_order(2.0), target, reference_scale=reference, truncate_steps=k, statistic=cfg.match_reward_scale
        )
        self.reward_scale = float(_broadcast(ctx, lam))
        self.match = {
            "reward_scale": self.reward_scale,
            "reference_reward_scale": reference,
            "statistic": cfg.match_reward_scale,
            "truncate_steps": k,
            "probe_samples": int(ode.adjoint_norms.shape[1]),
        }

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records: the lambda in use, what the match measured, the adaptive window's state."""
        return {
            "reward_scale": self.reward_scale,
            "reward_scale_match": self.match,
            "adaptive_truncation": None if self.truncation is None else self.truncation.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run's lambda and adaptive window: the checkpoint's (a straight run would have them)."""
        if self.match is None and state.get("reward_scale_match"):
            self.match = dict(state["reward_scale_match"])
            self.reward_scale = float(state["reward_scale"])
        if self.truncation is not None and state.get("adaptive_truncation"):
            self.truncation.load_state_dict(state["adaptive_truncation"])
            if self.truncation.steps is not None:
                self.truncate_steps = self.truncation.steps

    # -- what the run reports --------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """K and lambda for ``train_summary.json``."""
        return {
            "reward_scale": self.reward_scale,
            "reward_scale_match": self.match,
            "truncate_steps": self.truncate_steps,
            "truncate_steps_history": None if self.truncation is None else [list(h) for h in self.truncation.history],
        }

    def truncation_text(self) -> str | int:
        """K as the model card shows it: the fixed K, or 'auto' with the windows the probes picked."""
        if self.truncation is None:
            return self.truncate_steps
        ks = [k for _, k in self.truncation.history] or [self.truncate_steps]
        spread = f"{min(ks)}-{max(ks)}" if min(ks) != max(ks) else f"{ks[0]}"
        return f"{spread} (auto: the window holding {self.config.truncate_share:g} of the control energy)"

    def reward_scale_text(self) -> str | float:
        """lambda as the model card shows it: the one used, and what it was matched to."""
        if self.match is None:
            return self.reward_scale
        return (
            f"{self.reward_scale:.4g} (matched by {self.match['statistic']} to 2nd-order ODE-AM at lambda = "
            f"{self.match['reference_reward_scale']:g}, --match_reward_scale)"
        )

    def match_line(self) -> str:
        """The line printed after the matched-lambda probe."""
        cfg = self.config
        return (
            f"--match_reward_scale {cfg.match_reward_scale}: lambda = {self.reward_scale:.4g} for {cfg.method}"
            + (f" (order {cfg.reg_order:g})" if self.method.uses_reg_order else "")
            + f" asks for the control 2nd-order ODE-AM asks for at lambda = {cfg.reward_scale:g} over the last "
            f"{self.match['truncate_steps']} steps ({self.match['probe_samples']} samples)."
        )
