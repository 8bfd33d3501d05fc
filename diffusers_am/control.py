"""Regularizer of order p and the optimal control it induces (pure torch, paper time).

h(s) = s^p / p with p > 1; the optimal control for a costate ``a`` minimizes
h(|u|) + <a, u> and is phi_p(a) = -|a|^((2-p)/(p-1)) * a, so |phi_p(a)| = |a|^(1/(p-1)).
Norms are per sample, over every non-batch dimension.
"""

from __future__ import annotations

import math

import torch
from .errors import UserError


def check_order(order: float, name: str = "order") -> float:
    """Validate a regularization order p: a finite number > 1. Returns it as float."""
    try:
        p = float(order)
    except (TypeError, ValueError):
        raise UserError(f"`{name}` must be a number > 1 (e.g. 2, 4, 6 or 1.5); got {order!r}.") from None
    if not math.isfinite(p) or p <= 1.0:
        raise UserError(
            f"`{name}` must be a finite number > 1 (p = 2 is the quadratic, KL-like cost; "
            f"p <= 1 has no unique minimizer); got {order!r}."
        )
    return p


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over all non-batch dims: [B, ...] -> [B]."""
    if x.dim() < 1:
        raise UserError("expected a batched tensor [B, ...], got a 0-dim tensor")
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def control_cost(u: torch.Tensor, order: float) -> torch.Tensor:
    """Per-sample running cost h(|u|) = |u|^p / p.

    Args:
        u: control, shape [B, ...].
        order: p > 1.
    Returns:
        [B] tensor in u's dtype.
    """
    p = check_order(order)
    return per_sample_norm(u).pow(p) / p


def optimal_control(adjoint: torch.Tensor, order: float) -> torch.Tensor:
    """phi_p(a) = -|a|^((2-p)/(p-1)) * a per sample; zero where a = 0 (no NaN, no inf).

    Computed as -|a|^(1/(p-1)) * (a / |a|) with the per-sample norm and power in float64, so no intermediate
    overflows or underflows where the result itself fits ``adjoint``'s dtype (|a|^((2-p)/(p-1)) alone
    overflows float32 for p close to 1 and |a| > 1, or for large p and a tiny |a|). Where |phi_p(a)| itself
    exceeds the dtype (p close to 1 with a large adjoint: p = 1.01 and |a| = 50 ask for 50^100) the sample's
    control is inf, and the trainer skips that update.

    Args:
        adjoint: costate a, shape [B, ...].
        order: p > 1.
    Returns:
        the optimal control, same shape and dtype as ``adjoint``.
    """
    p = check_order(order)
    if p == 2.0:
        return -adjoint
    a = adjoint.double()
    norm = per_sample_norm(a)
    nonzero = norm > 0
    safe = torch.where(nonzero, norm, torch.ones_like(norm))
    magnitude = torch.where(nonzero, safe.pow(1.0 / (p - 1.0)), torch.zeros_like(norm))
    shape = (-1,) + (1,) * (adjoint.dim() - 1)
    return (-(magnitude / safe).reshape(shape) * a).to(adjoint.dtype)
