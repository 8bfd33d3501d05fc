"""Where the optimal control acts: a full-trajectory probe of its per-step size (pure torch, paper time).

One probe samples a batch with the current fine-tuned flow (no grad), integrates the lean adjoint back
over the *whole* trajectory with the base flow (one ``base_vjp`` per step), and keeps each sample's
adjoint norm |a~_k| per step. Everything else is a closed form of those norms:

* ODE-AM of order p: the target control u*_k = phi_p(a~_k), |u*_k| = |a~_k|^(1/(p-1)); it is also the
  target change of the velocity.
* SDE-AM (quadratic cost): u*_k = -sigma(t_k) a~_k; the velocity changes by sigma u / velocity_gain,
  i.e. |dv*_k| = sigma^2 |a~_k| / velocity_gain (= (1 - t) / t |a~_k| memoryless).
* energy e_k = dt_k <-a~_k, drift change> = dt_k |u*_k|^p (ODE) or dt_k |u*_k|^2 (SDE): the first-order
  decrease of the terminal cost g = -lambda r that the optimal control earns at step k (its reward gain
  times lambda). Its share over the last K steps is what truncation to K keeps.
* residual r_k = dt_k |u_theta(X_k) - u*_k|^2 (ODE-AM): what the matching loss of AM-Full still has to fit at
  step k, given the control learned so far (r_k = dt_k |u*_k|^2 before training).

The lean adjoint is linear in lambda (a~_N = -lambda grad r), so one probe at any lambda gives the profile
at every lambda (:meth:`ControlProfile.at`), and for ODE-AM at every order p (:meth:`ControlProfile.with_order`).
Cost of a probe: N no-grad forwards of the fine-tuned flow, one reward gradient, N base VJPs (SDE-AM: the
same on its refined grid).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch

from .errors import UserError
from .adjoint import lean_adjoint_window
from .checks import positive_float
from .control import check_order, per_sample_norm
from .flow import ConditionedFlow, check_time_grid, sample_euler
from .objectives import RewardFn, reward_and_grad
from .schedules import NoiseSchedule, refine_grid


@dataclass(frozen=True)
class ControlProfile:
    """What one probe measured, on the grid it integrated over (M steps; M = N for ODE-AM, M >= N for
    SDE-AM's refined grid). Tensors live on the CPU in fp32 or fp64.

    times: [M+1] the probe's paper times (increasing, t_M = 1).
    step_index: [M] the sampling step 0..N-1 of the trainer's grid each probe step belongs to.
    num_steps: N, the trainer's number of sampling steps.
    adjoint_norms: [M, B] per-sample |a~_k| at ``reward_scale``.
    reward_scale: lambda of the probe.
    order: p of the control cost (2 for SDE-AM).
    sigma, velocity_gain: [M] the SDE schedule at t_k (None for ODE-AM).
    learned_norms: [M, B] per-sample |u_theta| = |v_theta - b| along the probe's trajectory, the control the
        model has learned so far (ODE-AM only; None for SDE-AM).
    learned_dot_adjoint: [M, B] per-sample <u_theta, a~_k> at ``reward_scale`` (ODE-AM only), which with the
        norms gives |u_theta - phi_p(a~)| for every lambda and p.
    reward: [B] rewards of the probe's terminal states.
    """

    times: torch.Tensor
    step_index: torch.Tensor
    num_steps: int
    adjoint_norms: torch.Tensor
    reward_scale: float
    order: float = 2.0
    sigma: torch.Tensor | None = None
    velocity_gain: torch.Tensor | None = None
    learned_norms: torch.Tensor | None = None
    learned_dot_adjoint: torch.Tensor | None = None
    reward: torch.Tensor | None = None

    # -- views --------------------------------------------------------------------------------
    @property
    def method(self) -> str:
        return "ode-am" if self.sigma is None else "sde-am"

    @property
    def dt(self) -> torch.Tensor:
        """[M] step sizes."""
        return self.times[1:] - self.times[:-1]

    @property
    def scale_exponent(self) -> float:
        """q with |u*| and |dv*| proportional to lambda^q: 1 / (p - 1) for ODE-AM, 1 for SDE-AM."""
        return 1.0 / (self.order - 1.0) if self.sigma is None else 1.0

    def at(self, reward_scale: float) -> "ControlProfile":
        """The same profile at another lambda (the lean adjoint is linear in lambda)."""
        lam = positive_float(reward_scale, "reward_scale")
        ratio = lam / self.reward_scale
        dot = None if self.learned_dot_adjoint is None else self.learned_dot_adjoint * ratio
        return dataclasses.replace(
            self, adjoint_norms=self.adjoint_norms * ratio, reward_scale=lam, learned_dot_adjoint=dot
        )

    def with_order(self, order: float) -> "ControlProfile":
        """The ODE-AM profile for another order p (the lean adjoint does not depend on p)."""
        if self.sigma is not None:
            raise UserError("`order`: SDE-AM has the quadratic cost only; its profile has no other order.")
        return dataclasses.replace(self, order=check_order(order))

    def control_norms(self) -> torch.Tensor:
        """[M, B] |u*_k| in the method's control: |a~|^(1/(p-1)) (ODE) or sigma |a~| (SDE)."""
        if self.sigma is None:
            return self.adjoint_norms.pow(1.0 / (self.order - 1.0))
        return self.sigma[:, None] * self.adjoint_norms

    def velocity_change(self) -> torch.Tensor:
        """[M, B] |v*_theta - b| the target asks of the model: |u*| (ODE) or sigma^2 |a~| / gain (SDE)."""
        if self.sigma is None:
            return self.control_norms()
        return (self.sigma.pow(2) / self.velocity_gain)[:, None] * self.adjoint_norms

    def energy(self) -> torch.Tensor:
        """[M, B] dt_k |u*_k|^p (p = 2 for SDE): the terminal-cost decrease earned at step k, first order."""
        power = self.order if self.sigma is None else 2.0
        return self.dt[:, None] * self.control_norms().pow(power)

    def energy_per_step(self) -> torch.Tensor:
        """[N] batch-mean energy summed onto the trainer's sampling steps."""
        out = torch.zeros(self.num_steps, dtype=self.adjoint_norms.dtype)
        return out.index_add_(0, self.step_index, self.energy().mean(1))

    def energy_share(self) -> torch.Tensor:
        """[N] :meth:`energy_per_step` normalised to sum 1 (all zeros when the energy is zero)."""
        return _share(self.energy_per_step())

    def current_control(self) -> torch.Tensor | None:
        """[M] batch mean of |u_theta| (ODE-AM; None for SDE-AM)."""
        return None if self.learned_norms is None else self.learned_norms.mean(1)

    def residual(self) -> torch.Tensor | None:
        """[M, B] |u_theta - u*| per sample (ODE-AM; None for SDE-AM):
        |u|^2 - 2 <u, phi_p(a~)> + |phi_p(a~)|^2 with phi_p(a~) = -|a~|^((2-p)/(p-1)) a~."""
        if self.learned_norms is None:
            return None
        a = self.adjoint_norms
        scale = torch.where(a > 0, a, torch.ones_like(a)).pow((2.0 - self.order) / (self.order - 1.0))
        sq = self.learned_norms.pow(2) + 2.0 * scale * self.learned_dot_adjoint + self.control_norms().pow(2)
        return sq.clamp_min(0.0).sqrt()

    def residual_per_step(self) -> torch.Tensor | None:
        """[N] batch mean of dt_k |u_theta - u*_k|^2 summed onto the sampling steps (ODE-AM; None for SDE-AM)."""
        residual = self.residual()
        if residual is None:
            return None
        out = torch.zeros(self.num_steps, dtype=residual.dtype)
        return out.index_add_(0, self.step_index, self.dt * residual.pow(2).mean(1))

    def first_steps(self) -> torch.Tensor:
        """[N] index of the probe step that starts each sampling step (its own time t_k)."""
        return torch.searchsorted(self.step_index, torch.arange(self.num_steps))  # step_index is sorted

    def intensity_per_step(self) -> torch.Tensor:
        """[N] batch mean of |u*| at each sampling step's time t_k (the paper's per-step control norm)."""
        return self.control_norms().mean(1)[self.first_steps()]

    def step_times(self) -> torch.Tensor:
        """[N] the sampling steps' times t_0 .. t_{N-1}."""
        return self.times[self.first_steps()]

    def to_log(self) -> dict[str, list[float] | float | int]:
        """Plain lists for a log record (per sampling step, oldest first)."""
        out = {
            "probe_times": self.step_times().tolist(),
            "probe_intensity": self.intensity_per_step().tolist(),
            "probe_energy_share": self.energy_share().tolist(),
            "probe_reward_scale": self.reward_scale,
            "probe_order": self.order,
        }
        if self.learned_norms is not None:
            out["probe_current_control"] = self.current_control()[self.first_steps()].tolist()
            out["probe_residual_share"] = _share(self.residual_per_step()).tolist()
        if self.reward is not None:
            out["probe_reward_mean"] = float(self.reward.mean())
        return out


def _share(values: torch.Tensor) -> torch.Tensor:
    total = values.sum()
    return values / total if total > 0 else values


def probe_control_profile(
    flow: ConditionedFlow,
    noise: torch.Tensor,
    times: torch.Tensor,
    reward_fn: RewardFn,
    *,
    order: float = 2.0,
    reward_scale: float = 1.0,
    schedule: NoiseSchedule | None = None,
    generator: torch.Generator | None = None,
    refine: bool = True,
) -> ControlProfile:
    """Measure the optimal control's profile over the whole trajectory for one batch.

    Args:
        flow: the current fine-tuned flow; sampled without autograd, differentiated only through ``base_vjp``.
        noise: [B, ...] X_0.
        times: [N+1] the trainer's sampling grid (paper time).
        reward_fn: terminal states [B, ...] -> rewards [B], differentiable.
        order: p of ODE-AM (ignored by SDE-AM, which is quadratic).
        reward_scale: lambda (the profile rescales to any other with :meth:`ControlProfile.at`).
        schedule: None for ODE-AM (Euler); a noise schedule for SDE-AM (Euler-Maruyama with ``generator``,
            on ``refine_grid(times)`` when ``refine``, as ``objectives.sde_am_step`` samples).
    Returns:
        the :class:`ControlProfile` (CPU tensors). Raises NonFiniteRewardError on a NaN / inf reward.
    """
    check_time_grid(times)
    lam = positive_float(reward_scale, "reward_scale")
    num_steps = times.shape[0] - 1
    if schedule is None:
        order = check_order(order)
        grid, drift, noise_std, vjp = times, flow.velocity, None, flow.base_vjp
    else:
        order = 2.0
        grid = refine_grid(times, schedule) if refine else times
        drift = schedule.sde_drift(flow.velocity)
        noise_std, vjp = schedule.sigma, partial(schedule.drift_vjp, flow.base_vjp)
    m = grid.shape[0] - 1
    states = sample_euler(drift, noise, grid, record_last=m + 1, noise_std=noise_std, generator=generator)
    reward, grad_r = reward_and_grad(reward_fn, states[-1])
    window = lean_adjoint_window(vjp, states, grid, -lam * grad_r)
    adj = window.adjoints[:-1]
    adjoint_norms = per_sample_norm(adj.reshape((-1,) + adj.shape[2:])).reshape(m, -1)
    grid_cpu = grid.detach().cpu().to(adjoint_norms.dtype)
    step_index = torch.searchsorted(times.detach().cpu().to(grid_cpu.dtype), grid_cpu[:-1], right=True) - 1
    sigma = gain = learned = dot = None
    if schedule is None:  # Euler: v_theta(X_k) = (X_{k+1} - X_k) / dt_k, so the learned control is free
        dt = (grid[1:] - grid[:-1]).to(states.dtype).reshape((-1,) + (1,) * (states.dim() - 1))
        v_ft = (states[1:] - states[:-1]) / dt
        u = (v_ft - window.base_velocities.to(v_ft.dtype)).to(adj.dtype).reshape(m, adj.shape[1], -1)
        learned = torch.linalg.vector_norm(u, dim=2).cpu()
        dot = (u * adj.reshape(m, adj.shape[1], -1)).sum(2).cpu()
    else:
        t = grid[:-1].detach()
        sigma = torch.stack([schedule.sigma(tk) for tk in t]).cpu().to(adjoint_norms.dtype)
        gain = torch.stack([schedule.velocity_gain(tk) for tk in t]).cpu().to(adjoint_norms.dtype)
    return ControlProfile(
        times=grid_cpu,
        step_index=step_index,
        num_steps=num_steps,
        adjoint_norms=adjoint_norms.detach().cpu(),
        reward_scale=lam,
        order=order,
        sigma=sigma,
        velocity_gain=gain,
        learned_norms=learned,
        learned_dot_adjoint=dot,
        reward=reward.detach().cpu(),
    )
