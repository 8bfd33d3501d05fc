"""One update of each method: ODE-AM, SDE-AM, DRaFT-K and ReFL-K (pure torch, paper time).

Each ``*_step`` samples a batch with the current fine-tuned flow, computes its loss, and calls
``backward`` on it (per trained step for adjoint matching, so memory does not grow with K).
The caller owns the optimizer: gradient accumulation, clipping and the step stay in the trainer.
``micro_batch_size`` runs everything after the (no-grad, whole-batch) sampling in micro-batches, each
loss scaled by its share of the batch, so the accumulated gradient is the whole batch's; the flow and
``reward_fn`` must then offer ``rows(slice)`` (:func:`diffusers_am.batching.rows_of`).

``reward_fn(x) -> [B]`` maps terminal states X_N (the flow's state space) to rewards; it is
differentiable in x (decode + reward model). ``reward_scale`` is lambda: g(x) = -lambda r(x).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .errors import UserError
from .adjoint import lean_adjoint_window, upcast
from .batching import chunk_slices, rows_of
from .control import check_order, optimal_control, per_sample_norm
from .flow import ConditionedFlow, check_time_grid, check_truncation, sample_euler
from .schedules import MemorylessSchedule, NoiseSchedule, refine_grid

RewardFn = Callable[[torch.Tensor], torch.Tensor]
Backward = Callable[[torch.Tensor], None]


class NonFiniteRewardError(RuntimeError):
    """The reward or its gradient is NaN or inf: the update must be skipped."""


@dataclass
class StepOutput:
    """What one update reports.

    loss: the scalar objective (float, detached).
    reward: [B] rewards of the sampled batch at X_N (for ReFL: at its one-step prediction).
    control_norm_per_step: [K] batch mean of |u(X_k, t_k)| over the trained steps (u in the
        method's own control parametrisation), oldest first.
    final_states: [B, ...] the terminal states X_N (detached, fp32).
    step_index: for ReFL, the trajectory index the prediction was made from.
    """

    loss: float
    reward: torch.Tensor
    control_norm_per_step: torch.Tensor
    final_states: torch.Tensor
    step_index: int | None = None


def _scaled(loss: torch.Tensor, share: float) -> torch.Tensor:
    """A micro-batch's loss times its share of the batch (untouched for the whole batch)."""
    return loss if share == 1.0 else loss * share


def _default_backward(loss: torch.Tensor) -> None:
    loss.backward()


def _check_reward(reward: torch.Tensor, batch: int) -> None:
    if not isinstance(reward, torch.Tensor) or tuple(reward.shape) != (batch,):
        shape = tuple(reward.shape) if isinstance(reward, torch.Tensor) else type(reward).__name__
        raise UserError(f"the reward must return one value per sample, shape [{batch}]; got {shape}.")
    if not torch.isfinite(reward).all():
        raise NonFiniteRewardError(f"reward is NaN or inf for {int((~torch.isfinite(reward)).sum())} sample(s)")


def reward_and_grad(reward_fn: RewardFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x) [B] and grad_x r(x) [B, ...] in fp32; raises NonFiniteRewardError on NaN / inf."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        reward = reward_fn(x_in)
        _check_reward(reward, x.shape[0])
        (grad,) = torch.autograd.grad(reward.sum(), x_in)
    if not torch.isfinite(grad).all():
        raise NonFiniteRewardError("the reward gradient is NaN or inf")
    return upcast(reward.detach()), upcast(grad)


def matching_loss(u: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """E_batch |u - target|^2. ``reduction='sum'`` sums over each sample's dims (the spec's
    squared norm); ``'mean'`` averages them instead (same minimizer, resolution-free scale)."""
    sq = (upcast(u) - upcast(target)).pow(2).reshape(u.shape[0], -1)
    if reduction == "sum":
        return sq.sum(1).mean()
    if reduction == "mean":
        return sq.mean()
    raise UserError(f"`loss_reduction` must be 'sum' or 'mean'; got {reduction!r}.")


def _prepare(noise: torch.Tensor, times: torch.Tensor, truncate_steps: int) -> tuple[int, int]:
    check_time_grid(times)
    n = times.shape[0] - 1
    return n, check_truncation(truncate_steps, n)


def _adjoint_micro_batches(
    flow: ConditionedFlow, reward_fn: RewardFn, states: torch.Tensor, micro_batch_size: int | None
):
    """ODE-AM / SDE-AM per micro-batch: (the flow of its rows, its share of the batch, its recorded states
    [K+1, M, ...], its rewards r [M], grad r at its terminal states)."""
    batch = states.shape[1]
    for rows in chunk_slices(batch, micro_batch_size):
        xs = states[:, rows]
        reward, grad_r = reward_and_grad(rows_of(reward_fn, rows, batch), xs[-1])
        yield rows_of(flow, rows, batch), (rows.stop - rows.start) / batch, xs, reward, grad_r


def ode_am_step(
    flow: ConditionedFlow,
    noise: torch.Tensor,
    times: torch.Tensor,
    reward_fn: RewardFn,
    *,
    truncate_steps: int,
    order: float = 2.0,
    reward_scale: float = 1.0,
    loss_reduction: str = "sum",
    backward: Backward = _default_backward,
    micro_batch_size: int | None = None,
) -> StepOutput:
    """Truncated deterministic adjoint matching of order p (method.md sections 2-3).

    Samples X_0 = noise along ``times`` [N+1] with the fine-tuned flow (no grad), integrates the
    lean adjoint back over the last K steps with the base flow, and regresses
    u_theta = v_theta - b onto phi_p(a~_k):  L = (1/K) sum_k E |u_theta(X_k, t_k) - phi_p(a~_k)|^2.
    """
    order = check_order(order, "order")
    n, k_steps = _prepare(noise, times, truncate_steps)
    states = sample_euler(flow.velocity, noise, times, record_last=k_steps + 1)
    window_times = times[n - k_steps :]
    rewards, total, norms = [], 0.0, torch.zeros(k_steps)
    for part, share, xs, reward, grad_r in _adjoint_micro_batches(flow, reward_fn, states, micro_batch_size):
        rewards.append(reward)
        window = lean_adjoint_window(part.base_vjp, xs, window_times, -reward_scale * grad_r)
        adj = window.adjoints[:-1]
        targets = optimal_control(adj.reshape((-1,) + adj.shape[2:]), order).reshape(adj.shape)
        for k in range(k_steps):
            u = upcast(part.velocity(xs[k], window_times[k])) - upcast(window.base_velocities[k])
            loss = _scaled(matching_loss(u, targets[k], loss_reduction) / k_steps, share)
            backward(loss)
            total += float(loss.detach())
            norms[k] += float(per_sample_norm(u.detach()).mean()) * share
    return StepOutput(total, torch.cat(rewards), norms, states[-1])


def sde_am_step(
    flow: ConditionedFlow,
    noise: torch.Tensor,
    times: torch.Tensor,
    reward_fn: RewardFn,
    *,
    truncate_steps: int,
    schedule: NoiseSchedule | None = None,
    reward_scale: float = 1.0,
    loss_reduction: str = "sum",
    generator: torch.Generator | None = None,
    refine: bool = True,
    backward: Backward = _default_backward,
    micro_batch_size: int | None = None,
) -> StepOutput:
    """Stochastic adjoint matching (quadratic cost; method.md section 4).

    Euler-Maruyama with drift b_sigma(x, t) from the fine-tuned velocity and diffusion
    sigma(t) (memoryless by default, t clipped to [schedule.t_min, schedule.t_max]); lean adjoint
    through the base drift; loss (1/K) sum_k E |u_theta + sigma(t_k) a~_k|^2 with
    u_theta = velocity_gain(t) (v_theta - v_base) / sigma(t)  (= 2 (v_theta - v_base) / sigma memoryless).

    With ``refine`` (default) the grid gets extra points near t = 0 where the drift's -x / t term
    makes plain Euler-Maruyama unstable (``schedules.refine_grid``: a few extra no-grad forwards).
    The window is the last K steps of the given grid; K = N covers the whole refined grid.
    """
    schedule = schedule or MemorylessSchedule()
    n, k_steps = _prepare(noise, times, truncate_steps)
    if refine:
        start = times[n - k_steps]
        times = refine_grid(times, schedule)
        n = times.shape[0] - 1
        k_steps = n - int(torch.nonzero(times == start)[0, 0])

    drift = schedule.sde_drift(flow.velocity)
    states = sample_euler(drift, noise, times, record_last=k_steps + 1, noise_std=schedule.sigma, generator=generator)
    window_times = times[n - k_steps :]
    rewards, total, norms = [], 0.0, torch.zeros(k_steps)
    for part, share, xs, reward, grad_r in _adjoint_micro_batches(flow, reward_fn, states, micro_batch_size):
        rewards.append(reward)
        base_drift_vjp = partial(schedule.drift_vjp, part.base_vjp)  # one base VJP per step, LoRA off throughout
        window = lean_adjoint_window(base_drift_vjp, xs, window_times, -reward_scale * grad_r)
        for k in range(k_steps):
            t = window_times[k]
            gain, coeff = schedule.velocity_gain(t), schedule.state_coeff(t)
            sigma = schedule.sigma(t).clamp_min(1e-6)
            v_base = (upcast(window.base_velocities[k]) + coeff * xs[k]) / gain
            u = gain * (upcast(part.velocity(xs[k], t)) - v_base) / sigma
            loss = _scaled(matching_loss(u, -sigma * window.adjoints[k], loss_reduction) / k_steps, share)
            backward(loss)
            total += float(loss.detach())
            norms[k] += float(per_sample_norm(u.detach()).mean()) * share
    return StepOutput(total, torch.cat(rewards), norms, states[-1])


@torch.no_grad()
def _control_norms(flow: ConditionedFlow, states: list[torch.Tensor], times: torch.Tensor, v_ft: list[torch.Tensor]):
    return torch.stack(
        [
            per_sample_norm(upcast(v.detach()) - upcast(flow.base_velocity(x, t))).mean()
            for x, t, v in zip(states, times, v_ft)
        ]
    )


def draft_step(
    flow: ConditionedFlow,
    noise: torch.Tensor,
    times: torch.Tensor,
    reward_fn: RewardFn,
    *,
    truncate_steps: int,
    reward_scale: float = 1.0,
    track_control: bool = True,
    backward: Backward = _default_backward,
    micro_batch_size: int | None = None,
) -> StepOutput:
    """DRaFT-K: autograd through the last K Euler steps only; loss -lambda * E r(X_N)."""
    n, k_steps = _prepare(noise, times, truncate_steps)
    start = sample_euler(flow.velocity, noise, times, stop_at=n - k_steps)[-1]
    batch = noise.shape[0]
    total, rewards, finals, norms = 0.0, [], [], []
    for rows in chunk_slices(batch, micro_batch_size):
        part, share = rows_of(flow, rows, batch), (rows.stop - rows.start) / batch
        x = start[rows]
        visited, velocities = [], []
        with torch.enable_grad():
            for k in range(n - k_steps, n):
                visited.append(x.detach())
                v = part.velocity(x, times[k])
                velocities.append(v)
                x = x + upcast(times[k + 1] - times[k]) * upcast(v)
            reward, loss = _reward_loss(reward_fn, rows, batch, x, reward_scale, share, backward)
        total += float(loss.detach())
        rewards.append(upcast(reward.detach()))
        finals.append(x.detach())
        if track_control:
            norms.append(_control_norms(part, visited, times[n - k_steps : n], velocities) * share)
    norms = torch.stack(norms).sum(0) if track_control else torch.full((k_steps,), float("nan"))
    return StepOutput(total, torch.cat(rewards), norms, torch.cat(finals))


def _reward_loss(
    reward_fn: RewardFn, rows: slice, batch: int, x: torch.Tensor, reward_scale: float, share: float, backward: Backward
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRaFT / ReFL on one micro-batch: the reward r [M] of its terminal states x [M, ...] and the loss
    -lambda * mean r, scaled by the micro-batch's share of the batch, backpropagated; returns (r, loss)."""
    reward = rows_of(reward_fn, rows, batch)(x)
    _check_reward(reward, x.shape[0])
    loss = _scaled(-(reward_scale * upcast(reward)).mean(), share)
    backward(loss)
    return reward, loss


def refl_step(
    flow: ConditionedFlow,
    noise: torch.Tensor,
    times: torch.Tensor,
    reward_fn: RewardFn,
    *,
    truncate_steps: int,
    reward_scale: float = 1.0,
    generator: torch.Generator | None = None,
    track_control: bool = True,
    backward: Backward = _default_backward,
    micro_batch_size: int | None = None,
) -> StepOutput:
    """ReFL-K: draw j uniformly among the last K steps, predict x_1 = x_j + (1 - t_j) v_theta(x_j, t_j)
    with autograd, loss -lambda * E r(x_1)."""
    n, k_steps = _prepare(noise, times, truncate_steps)
    offset = int(torch.randint(k_steps, (1,), generator=generator))
    j = n - k_steps + offset
    start = sample_euler(flow.velocity, noise, times, stop_at=j)[-1]
    t = times[j]
    batch = noise.shape[0]
    total, rewards, finals, norms = 0.0, [], [], []
    for rows in chunk_slices(batch, micro_batch_size):
        part, share = rows_of(flow, rows, batch), (rows.stop - rows.start) / batch
        x = start[rows]
        with torch.enable_grad():
            v = part.velocity(x, t)
            x1 = x + (1.0 - upcast(t)) * upcast(v)
            reward, loss = _reward_loss(reward_fn, rows, batch, x1, reward_scale, share, backward)
        total += float(loss.detach())
        rewards.append(upcast(reward.detach()))
        finals.append(x1.detach())
        if track_control:
            norms.append(_control_norms(part, [x], times[j : j + 1], [v]) * share)
    norms = torch.stack(norms).sum(0) if track_control else torch.full((1,), float("nan"))
    return StepOutput(total, torch.cat(rewards), norms, torch.cat(finals), step_index=j)
