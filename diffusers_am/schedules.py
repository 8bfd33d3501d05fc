"""Noise schedules sigma(t) for stochastic adjoint matching (pure torch, paper time).

For the interpolant X_t = t X_data + (1 - t) X_noise with velocity v, the SDE with the same
marginals and diffusion sigma(t) has drift

    b_sigma(x, t) = v + (sigma^2 / 2) * score,   score = -(x - t v) / (1 - t)
                  = velocity_gain(t) * v - state_coeff(t) * x,

    velocity_gain(t) = 1 + sigma^2 t / (2 (1 - t)),   state_coeff(t) = sigma^2 / (2 (1 - t)).

A control enters as b + sigma * u, so u = velocity_gain * (v_theta - v_base) / sigma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError
from .adjoint import VJP, Velocity, upcast


@dataclass(frozen=True)
class NoiseSchedule:
    """Base class. ``t_min`` / ``t_max`` clip t before any evaluation (the SDE diverges at t = 0)."""

    t_min: float = 1e-2
    t_max: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 < self.t_min < self.t_max <= 1.0):
            raise UserError(
                f"schedule clip must satisfy 0 < t_min < t_max <= 1; got t_min={self.t_min}, t_max={self.t_max}."
            )

    def clip(self, t: torch.Tensor) -> torch.Tensor:
        return t.clamp(self.t_min, self.t_max)

    def sigma2(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma2(t).clamp_min(0).sqrt()

    def velocity_gain(self, t: torch.Tensor) -> torch.Tensor:
        t = self.clip(t)
        return 1.0 + self.sigma2(t) * t / (2.0 * (1.0 - t))

    def state_coeff(self, t: torch.Tensor) -> torch.Tensor:
        t = self.clip(t)
        return self.sigma2(t) / (2.0 * (1.0 - t))

    def drift(self, x: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """b_sigma(x, t) from a velocity v(x, t); t a 0-dim tensor."""
        return self.velocity_gain(t) * v - self.state_coeff(t) * x

    def sde_drift(self, velocity: Velocity) -> Velocity:
        """The SDE drift x, t -> b_sigma(x, t) of a velocity field (e.g. ``ConditionedFlow.velocity``), its
        velocity promoted to at least fp32: what Euler-Maruyama (``flow.sample_euler``) steps with."""

        def drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.drift(x, upcast(velocity(x, t)), t)

        return drift

    def drift_vjp(
        self, velocity_vjp: VJP, x: torch.Tensor, t: torch.Tensor, cotangent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(b_sigma(x, t), J_{b_sigma}(x, t)^T cotangent) from one velocity VJP.

        The drift is linear in v and x, so J^T a = J_v^T (velocity_gain a) - state_coeff a;
        ``velocity_vjp(x, t, c)`` returns (v(x, t), J_v^T c) (e.g. ``ConditionedFlow.base_vjp``)."""
        v, jt = velocity_vjp(x, t, self.velocity_gain(t) * cotangent)
        return self.drift(x, upcast(v), t), jt - self.state_coeff(t) * cotangent


@dataclass(frozen=True)
class MemorylessSchedule(NoiseSchedule):
    """sigma(t)^2 = scale * 2 (1 - t) / t. ``scale = 1`` is memoryless: the fine-tuned law is the
    reward-tilted base law, and the drift is b = 2 v - x / t. Other scales are biased variants."""

    scale: float = 1.0

    def sigma2(self, t: torch.Tensor) -> torch.Tensor:
        t = self.clip(t)
        return self.scale * 2.0 * (1.0 - t) / t

    # Closed forms (no division by 1 - t, exact at t = 1).
    def velocity_gain(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t) * (1.0 + self.scale)

    def state_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return self.scale / self.clip(t)


@dataclass(frozen=True)
class ConstantSchedule(NoiseSchedule):
    """sigma(t) = level, constant. Needs ``t_max < 1`` (the drift has a 1 / (1 - t) factor)."""

    level: float = 1.0
    t_max: float = 0.99

    def sigma2(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, self.level**2)


@dataclass(frozen=True)
class LinearSchedule(NoiseSchedule):
    """sigma(t)^2 = 2 (1 - t): SiT's diffusion coefficient w_t = sigma_t = 1 - t (its ``sigma`` and ``linear``
    forms; SiT's SDE has noise sqrt(2 w_t)). Bounded at t = 0, zero at t = 1; the drift is b = (1 + t) v - x."""

    def sigma2(self, t: torch.Tensor) -> torch.Tensor:
        return 2.0 * (1.0 - self.clip(t))

    # Closed forms (no division by 1 - t, exact at t = 1).
    def velocity_gain(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 + self.clip(t)

    def state_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)


@dataclass(frozen=True)
class SineSchedule(NoiseSchedule):
    """sigma(t)^2 = 2 sin^2(pi t): SiT's w_t = sin^2(pi t) (its ``increasing-decreasing`` form): zero at both
    ends, largest at t = 1/2. sin^2(pi t) / (1 - t) -> 0 as t -> 1, so the drift is finite (taken as its limit,
    b = v, at t = 1)."""

    def sigma2(self, t: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sin(torch.pi * self.clip(t)) ** 2

    def state_coeff(self, t: torch.Tensor) -> torch.Tensor:
        t = self.clip(t)
        gap = 1.0 - t
        return torch.where(gap > 0, torch.sin(torch.pi * t) ** 2 / gap.clamp_min(1e-12), torch.zeros_like(t))

    def velocity_gain(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 + self.clip(t) * self.state_coeff(t)


SCHEDULES = {"memoryless": MemorylessSchedule, "constant": ConstantSchedule, "linear": LinearSchedule,
             "sine": SineSchedule}
"""By ``--sde_schedule`` name. The paper's Appendix D.2 compares SiT's three diffusion coefficients (Ma et al. 2024):
memoryless (SiT's ``SBDM``), ``linear`` (its ``sigma``) and ``sine`` (its ``increasing-decreasing``)."""


def get_schedule(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by name: one of ``SCHEDULES``."""
    if name not in SCHEDULES:
        raise UserError(f"unknown noise schedule {name!r}; choose one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name](**kwargs)


def refine_grid(times: torch.Tensor, schedule: NoiseSchedule, max_step: float = 0.5) -> torch.Tensor:
    """Insert points into ``times`` [N+1] so every Euler-Maruyama step is stable.

    The drift's state term is -state_coeff(t) x (= -x / t memoryless); an Euler step keeps it
    stable when dt * state_coeff(t_k) <= ``max_step``. Near t = 0 (clipped to ``t_min``) that
    needs steps of about t / 2: the inserted points grow geometrically from 0 until the
    original grid is fine enough. Every original point is kept, so the last K steps of the
    original grid are the last K of the refined one whenever the window avoids t ~ 0.

    Returns the refined increasing grid [N'+1], N' >= N, same dtype and device.
    """
    if not 0 < max_step < 1:
        raise UserError(f"`max_step` must be in (0, 1); got {max_step}.")
    points = [times[0]]
    for k in range(times.shape[0] - 1):
        target = times[k + 1]
        while True:
            t = points[-1]
            step = max_step / float(schedule.state_coeff(t.clamp_min(schedule.t_min)))
            if float(target - t) <= step * (1 + 1e-6):
                break
            points.append(t + step)
        points.append(target)
    return torch.stack(points)
