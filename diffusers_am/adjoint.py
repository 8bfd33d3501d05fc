"""The lean adjoint over a truncated window (pure torch, paper time).

For the Euler step X_{k+1} = X_k + dt_k (b(X_k, t_k) + u(X_k, t_k)) the exact discrete adjoint,
with the control's Jacobian dropped ("lean"), is

    a~_N = grad g(X_N),     a~_k = a~_{k+1} + dt_k * J_b(X_k, t_k)^T a~_{k+1},

one vector-Jacobian product through the base velocity per step. The adjoint is carried in
at least fp32 whatever the model dtype (fp64 stays fp64, bf16 / fp16 models still give fp32).

The window takes the VJP itself (``base_vjp(x, t, cotangent)``), not a velocity: a flow whose
base is its fine-tuned model with the LoRA switched off must run the backward inside the same
switch as the forward (a gradient-checkpointed model recomputes its forward during the
backward); :meth:`~diffusers_am.flow.ConditionedFlow.base_vjp` does both.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import torch
from .errors import UserError

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""velocity(x [B, ...], t 0-dim tensor) -> [B, ...], in paper time."""

VJP = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""vjp(x [B, ...], t 0-dim, cotangent [B, ...]) -> (f(x, t) detached, J_f(x, t)^T cotangent in at least fp32)."""


def check_window(states: torch.Tensor, times: torch.Tensor, terminal_grad: torch.Tensor | None = None) -> None:
    """Validate a recorded window: ``states`` [K+1, B, ...], ``times`` [K+1] strictly increasing in
    [0, 1], ``terminal_grad`` [B, ...] finite. Raises ValueError naming the argument."""
    if states.dim() < 2:
        raise UserError(f"`states` must be [K+1, B, ...] with K >= 1; got shape {tuple(states.shape)}.")
    if states.shape[0] < 2:
        raise UserError(
            f"`states` holds {states.shape[0]} state(s): a window of K >= 1 steps needs K+1 >= 2 states."
        )
    if times.dim() != 1 or times.shape[0] != states.shape[0]:
        raise UserError(
            f"`times` must be 1-D with one time per state ({states.shape[0]}); got shape {tuple(times.shape)}."
        )
    if not torch.isfinite(times).all() or times.min() < 0 or times.max() > 1:
        raise UserError(f"`times` must lie in [0, 1] (paper time: 0 noise, 1 data); got {times.tolist()}.")
    if not (times[1:] > times[:-1]).all():
        raise UserError(f"`times` must be strictly increasing (paper time); got {times.tolist()}.")
    if terminal_grad is not None:
        if terminal_grad.shape != states.shape[1:]:
            raise UserError(
                f"`terminal_grad` must have the shape of one state {tuple(states.shape[1:])}; "
                f"got {tuple(terminal_grad.shape)}."
            )
        if not torch.isfinite(terminal_grad).all():
            raise UserError("`terminal_grad` contains NaN or inf: check the reward and its gradient.")


class AdjointWindow(NamedTuple):
    """Lean adjoints a~ [K+1, B, ...] (fp32) and base velocities b(X_k, t_k) [K, B, ...] (detached)
    evaluated on the way, k = N-K .. N-1 (reusable by the loss: no second base forward)."""

    adjoints: torch.Tensor
    base_velocities: torch.Tensor


def vjp_velocity(
    velocity: Velocity, x: torch.Tensor, t: torch.Tensor, cotangent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (velocity(x, t) detached, J^T cotangent in at least fp32): one forward and its
    backward, both inside this call. Only x gets a gradient."""
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        v = velocity(x_in, t)
        (g,) = torch.autograd.grad(v, x_in, grad_outputs=cotangent.to(v.dtype))
    return v.detach(), g.to(accumulation_dtype(cotangent.dtype))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The adjoint's dtype: ``dtype`` promoted to at least fp32."""
    return torch.promote_types(dtype, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`accumulation_dtype` (bf16 -> fp32, fp32 and fp64 stay)."""
    return x.to(accumulation_dtype(x.dtype))


def lean_adjoint_window(
    base_vjp: VJP, states: torch.Tensor, times: torch.Tensor, terminal_grad: torch.Tensor
) -> AdjointWindow:
    """Integrate the lean adjoint back over the window with one ``base_vjp`` call per step (the
    module docstring); ``base_vjp(x, t, a)`` returns (b(x, t), J_b(x, t)^T a)."""
    check_window(states, times, terminal_grad)
    num_steps = states.shape[0] - 1
    adjoints = [None] * (num_steps + 1)
    base_velocities = [None] * num_steps
    a = terminal_grad.detach().to(accumulation_dtype(terminal_grad.dtype))
    adjoints[num_steps] = a
    times32 = times.detach().to(a.dtype)
    for k in range(num_steps - 1, -1, -1):
        dt = times32[k + 1] - times32[k]
        v, jt_a = base_vjp(states[k], times[k], a)
        a = a + dt * jt_a.to(a.dtype)
        adjoints[k] = a
        base_velocities[k] = v
    return AdjointWindow(torch.stack(adjoints), torch.stack(base_velocities))


def lean_adjoint(
    velocity: Velocity, states: torch.Tensor, times: torch.Tensor, terminal_grad: torch.Tensor
) -> torch.Tensor:
    """Lean adjoints a~_{N-K} .. a~_N of the Euler sampler over the last K steps.

    Args:
        velocity: base velocity ``velocity(x, t)`` in paper time, t a 0-dim tensor.
        states: [K+1, B, ...] the last K+1 states X_{N-K} .. X_N the Euler sampler visited.
        times: [K+1] their strictly increasing paper times in [0, 1].
        terminal_grad: [B, ...] grad g(X_N) (= -lambda * grad r(X_N)).
    Returns:
        [K+1, B, ...] in fp32 (fp64 if ``terminal_grad`` is fp64); the last entry equals ``terminal_grad``.
    """
    return lean_adjoint_window(partial(vjp_velocity, velocity), states, times, terminal_grad).adjoints
