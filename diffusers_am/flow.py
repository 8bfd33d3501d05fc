"""The flow a trainer drives, bound to one batch's conditioning, and its Euler sampler.

Everything here is in paper time: t = 0 noise, t = 1 data, dX/dt = velocity(X, t).
Model adapters (``diffusers_am.models``) build a :class:`ConditionedFlow` for a batch; the
objectives only see this protocol.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from .errors import UserError
from .adjoint import vjp_velocity


@runtime_checkable
class ConditionedFlow(Protocol):
    """A flow model bound to one batch of prompts or class labels.

    Both velocities take x [B, ...] (fp32 states; the adapter casts to the model dtype) and a
    0-dim paper time t, and return [B, ...] in paper time. ``base_velocity`` serves no-grad uses
    (sampling, control norms); the adjoint differentiates the base only through ``base_vjp``.
    Flows without an adapter switch get ``base_vjp`` from :class:`PlainBaseVJP`.
    """

    def base_velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The frozen base velocity b(x, t): adapters disabled."""

    def base_vjp(self, x: torch.Tensor, t: torch.Tensor, cotangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b(x, t) detached, J_b(x, t)^T cotangent in at least fp32): one base forward and its
        backward, both with the adapters disabled, so that a gradient-checkpointed model recomputes
        the very forward it saved (:func:`~diffusers_am.adjoint.vjp_velocity` inside the switch)."""

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The fine-tuned velocity v_theta(x, t): adapters enabled; differentiable in the
        trainable parameters when grad is enabled."""


class PlainBaseVJP:
    """Mixin for flows whose ``base_velocity`` has no switch to hold (toys, closed forms):
    ``base_vjp`` is autograd through ``base_velocity``."""

    def base_vjp(self, x: torch.Tensor, t: torch.Tensor, cotangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return vjp_velocity(self.base_velocity, x, t, cotangent)


def check_truncation(truncate_steps: int, num_steps: int, name: str = "truncate_steps") -> int:
    """Validate K against the N steps of a trajectory: 1 <= K <= N (the one check of K; ``name`` is how the
    message names K, e.g. ``--truncate_steps``)."""
    if isinstance(truncate_steps, bool) or not isinstance(truncate_steps, (int, float)) or (
        int(truncate_steps) != truncate_steps
    ):
        raise UserError(f"`{name}` must be an integer in [1, {num_steps}]; got {truncate_steps!r}.")
    k = int(truncate_steps)
    if not 1 <= k <= num_steps:
        raise UserError(
            f"`{name}` (K) must be in [1, num_inference_steps={num_steps}]; got {k}. "
            f"Use K = {num_steps} for full adjoint matching, or raise --num_inference_steps."
        )
    return k


def check_time_grid(times: torch.Tensor) -> None:
    """A sampling grid: 1-D, >= 2 points, strictly increasing, in [0, 1]."""
    if times.dim() != 1 or times.shape[0] < 2:
        raise UserError(f"`times` must be a 1-D grid of N+1 >= 2 paper times; got shape {tuple(times.shape)}.")
    if not torch.isfinite(times).all() or times.min() < 0 or times.max() > 1:
        raise UserError(f"`times` must lie in [0, 1] (paper time: 0 noise, 1 data); got {times.tolist()}.")
    if not (times[1:] > times[:-1]).all():
        raise UserError(f"`times` must be strictly increasing (paper time); got {times.tolist()}.")


Drift = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_euler(
    drift: Drift,
    x0: torch.Tensor,
    times: torch.Tensor,
    record_last: int = 1,
    stop_at: int | None = None,
    noise_std: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler (or Euler-Maruyama) sampling without autograd, in fp32.

    X_{k+1} = X_k + dt_k * drift(X_k, t_k) [+ noise_std(t_k) * sqrt(dt_k) * eps].

    Args:
        drift: drift(x, t) in paper time.
        x0: [B, ...] initial state at times[0].
        times: [N+1] increasing grid.
        record_last: how many of the last visited states to return.
        stop_at: stop after reaching state index ``stop_at`` (default N).
        noise_std: diffusion coefficient sigma(t) for Euler-Maruyama (None: ODE).
        generator: for the Euler-Maruyama noise.
    Returns:
        [record_last, B, ...] in fp32 (fp64 if ``x0`` is fp64): states X_{M-record_last+1} .. X_M, M = stop_at.
    """
    end = times.shape[0] - 1 if stop_at is None else stop_at
    if not 1 <= record_last <= end + 1:
        raise UserError(f"`record_last` must be in [1, {end + 1}]; got {record_last}.")
    x = x0.to(torch.promote_types(x0.dtype, torch.float32))
    kept = [x] if end + 1 - record_last <= 0 else []
    for k in range(end):
        t, dt = times[k], (times[k + 1] - times[k]).to(x.dtype)
        x = x + dt * drift(x, t).to(x.dtype)
        if noise_std is not None:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + noise_std(t).to(x.dtype) * dt.sqrt() * eps
        if k + 1 >= end + 1 - record_last:
            kept.append(x)
    return torch.stack(kept)
