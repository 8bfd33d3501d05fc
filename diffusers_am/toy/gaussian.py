"""The 1-D Gaussian rectified flow of method.md section 6, with its closed forms (paper time).

Data X_1 ~ N(m, s^2), noise X_0 ~ N(0, 1), X_t = t X_1 + (1 - t) X_0, so X_t ~ N(t m, D(t)) with
D(t) = (1 - t)^2 + t^2 s^2. The rectified-flow velocity E[X_1 - X_0 | X_t = x] is affine in x:

    b(x, t) = alpha(t) x + beta(t),   alpha = D'(t) / (2 D(t)) = (t s^2 - (1 - t)) / D(t),
                                      beta  = m - alpha(t) t m.

Reward r(x) = c x, terminal cost g = -lambda r. Since alpha = (log D)' / 2, the lean adjoint is

    a~(t) = -lambda c exp(int_t^1 alpha) = -lambda c s / sqrt(D(t)),

independent of x; u*(t) = phi_p(a~(t)); |a~| peaks where D is smallest, t* = 1 / (1 + s^2).
A time-only control u(t) active on [t_s, 1] shifts the terminal mean by
delta = int_{t_s}^1 exp(int_t^1 alpha) u(t) dt = int_{t_s}^1 s u(t) / sqrt(D(t)) dt.

Closed forms take ``t`` as a float or tensor and return float64 tensors (or ``t``'s float dtype).
States are [B, ...]; every coordinate is an independent copy of the 1-D problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..checks import finite_float, int_at_least
from ..control import check_order, optimal_control
from ..flow import PlainBaseVJP
from ..schedules import MemorylessSchedule

TimeControl = Callable[[torch.Tensor], torch.Tensor]
"""u(t): [T] paper times -> [T] control values (a control that ignores the state)."""


def _time(t: torch.Tensor | float) -> torch.Tensor:
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        return t
    return torch.as_tensor(t, dtype=torch.float64)


def _check_unit_interval(value: float, name: str) -> float:
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise UserError(f"`{name}` must be a paper time in [0, 1) (0 noise, 1 data); got {value!r}.")
    return v


@dataclass(frozen=True)
class GaussianToy:
    """X_1 ~ N(mean, std^2) rectified flow with reward r(x) = reward_slope * x (sum over coordinates)
    and terminal cost g = -reward_scale * r."""

    mean: float = 1.0
    std: float = 0.5
    reward_slope: float = 1.0
    reward_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("mean", "std", "reward_slope", "reward_scale"):
            finite_float(getattr(self, name), name)
        if self.std <= 0:
            raise UserError(f"`std` (s, the data standard deviation) must be > 0; got {self.std!r}.")
        if self.reward_slope * self.reward_scale == 0:
            raise UserError("`reward_slope` and `reward_scale` must both be non-zero (else the control is zero).")

    # ----- the base flow -------------------------------------------------------------------
    def variance(self, t: torch.Tensor | float) -> torch.Tensor:
        """D(t) = Var X_t = (1 - t)^2 + t^2 s^2."""
        t = _time(t)
        return (1 - t) ** 2 + t**2 * self.std**2

    def alpha(self, t: torch.Tensor | float) -> torch.Tensor:
        """alpha(t) = d b / d x = (t s^2 - (1 - t)) / D(t)."""
        t = _time(t)
        return (t * self.std**2 - (1 - t)) / self.variance(t)

    def beta(self, t: torch.Tensor | float) -> torch.Tensor:
        """beta(t) = m - alpha(t) t m."""
        t = _time(t)
        return self.mean - self.alpha(t) * t * self.mean

    def base_velocity(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """b(x, t) = alpha(t) x + beta(t); x [B, ...], t a 0-dim paper time. Same dtype as x."""
        t = _time(t)
        if t.dim() == 0:  # the sampler's case: scalar coefficients, no per-step tensor ops
            tf = float(t)
            a = (tf * self.std**2 - (1 - tf)) / ((1 - tf) ** 2 + tf**2 * self.std**2)
            return a * x + (self.mean - a * tf * self.mean)
        t = t.to(torch.float64)
        return self.alpha(t).to(x.dtype) * x + self.beta(t).to(x.dtype)

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        """r(x) = c * sum of coordinates: [B, ...] -> [B] (differentiable)."""
        if x.dim() < 1:
            raise UserError("`x` must be batched, shape [B, ...].")
        return self.reward_slope * x.reshape(x.shape[0], -1).sum(1)

    # ----- the control problem -------------------------------------------------------------
    @property
    def terminal_adjoint(self) -> float:
        """a~(1) = grad g = -lambda c."""
        return -self.reward_scale * self.reward_slope

    @property
    def peak_time(self) -> float:
        """t* = 1 / (1 + s^2), where alpha = 0 and |a~(t)| is largest (Proposition 4.1)."""
        return 1.0 / (1.0 + self.std**2)

    def lean_adjoint(self, t: torch.Tensor | float) -> torch.Tensor:
        """a~(t) = -lambda c s / sqrt(D(t)) (the continuous lean adjoint, any x)."""
        return self.terminal_adjoint * self.std / self.variance(t).sqrt()

    def euler_lean_adjoint(self, times: torch.Tensor) -> torch.Tensor:
        """The exact discrete lean adjoint of Euler on ``times`` [K+1]:
        a~_k = prod_{j >= k} (1 + dt_j alpha(t_j)) a~(1). Returns [K+1] float64."""
        t = times.detach().to(torch.float64)
        factors = 1 + (t[1:] - t[:-1]) * self.alpha(t[:-1])
        tail = torch.flip(torch.cumprod(torch.flip(factors, [0]), 0), [0])
        return self.terminal_adjoint * torch.cat([tail, torch.ones(1, dtype=torch.float64)])

    def optimal_control(self, t: torch.Tensor | float, order: float = 2.0) -> torch.Tensor:
        """u*(t) = phi_p(a~(t)) = -sign(a~) |a~|^(1/(p-1)); same shape as t."""
        a = self.lean_adjoint(t)
        return optimal_control(a.reshape(-1, 1), check_order(order)).reshape(a.shape)

    def normalized_profile(self, t: torch.Tensor | float, order: float = 2.0) -> torch.Tensor:
        """(|a~(t)| / |a~(t*)|)^(1/(p-1)) = (D(t*) / D(t))^(1/(2(p-1))), in (0, 1] (Proposition 4.2)."""
        p = check_order(order)
        ratio = self.variance(self.peak_time) / self.variance(t)
        return ratio ** (1.0 / (2.0 * (p - 1.0)))

    def propagator(self, t: torch.Tensor | float) -> torch.Tensor:
        """exp(int_t^1 alpha) = s / sqrt(D(t)): how a unit push at time t moves X_1."""
        return self.std / self.variance(t).sqrt()

    def terminal_mean_shift(
        self,
        control: TimeControl | None = None,
        *,
        order: float = 2.0,
        window_start: float = 0.0,
        quadrature_nodes: int = 256,
    ) -> float:
        """delta = int_{t_s}^1 s u(t) / sqrt(D(t)) dt (Gauss-Legendre): the change of E X_1 made by a
        time-only control u (default: u* of ``order``) active on [window_start, 1]."""
        t_s = _check_unit_interval(window_start, "window_start")
        nodes, weights = np.polynomial.legendre.leggauss(int_at_least(quadrature_nodes, "quadrature_nodes", 2))
        half = (1.0 - t_s) / 2.0
        t = torch.as_tensor(t_s + half * (nodes + 1.0), dtype=torch.float64)
        w = torch.as_tensor(half * weights, dtype=torch.float64)
        u = self.optimal_control(t, order) if control is None else control(t).to(torch.float64)
        if u.shape != t.shape:
            raise UserError(f"`control` must map [T] times to [T] values; got shape {tuple(u.shape)}.")
        return float((w * self.propagator(t) * u).sum())

    # ----- stochastic adjoint matching (memoryless, quadratic) -----------------------------
    def sde_propagator(self, t: torch.Tensor | float) -> torch.Tensor:
        """exp(int_t^1 (2 alpha(r) - 1/r) dr) = s^2 t / D(t): the memoryless drift 2 b - x / t's
        sensitivity of X_1 to X_t."""
        t = _time(t)
        return self.std**2 * t / self.variance(t)

    def sde_lean_adjoint(self, t: torch.Tensor | float) -> torch.Tensor:
        """Lean adjoint through the memoryless drift 2 b - x / t: a~(t) = -lambda c s^2 t / D(t)."""
        return self.terminal_adjoint * self.sde_propagator(t)

    def sde_optimal_control(self, t: torch.Tensor | float, schedule: MemorylessSchedule | None = None) -> torch.Tensor:
        """SDE-AM optimal control u*(t) = -sigma(t) a~(t) (control enters the drift as sigma u)."""
        schedule = schedule or MemorylessSchedule()
        t = _time(t)
        return -schedule.sigma(t) * self.sde_lean_adjoint(t)


class MLPControl(nn.Module):
    """u_theta(x, t): a small MLP applied to each coordinate of x with time features.

    Input x [B, ...] and a 0-dim t; output [B, ...]. The last layer starts at zero, so a fresh
    control is u = 0 (the fine-tuned flow starts at the base flow, as a LoRA does).
    """

    def __init__(self, hidden: int = 32, depth: int = 2, time_frequencies: int = 3) -> None:
        super().__init__()
        if int(hidden) < 1 or int(depth) < 1 or int(time_frequencies) < 0:
            raise UserError(
                f"MLPControl needs hidden >= 1, depth >= 1, time_frequencies >= 0; "
                f"got hidden={hidden}, depth={depth}, time_frequencies={time_frequencies}."
            )
        self.register_buffer("frequencies", torch.arange(1, int(time_frequencies) + 1) * math.pi, persistent=False)
        layers: list[nn.Module] = []
        width = 2 + 2 * int(time_frequencies)
        for _ in range(int(depth)):
            layers += [nn.Linear(width, int(hidden)), nn.SiLU()]
            width = int(hidden)
        out = nn.Linear(width, 1)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def features(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """[B*D, 2 + 2F]: the coordinate, t, and sin/cos(k pi t) for k = 1..F."""
        dtype = self.net[0].weight.dtype
        flat = x.reshape(-1, 1).to(dtype)
        t = _time(t).to(dtype).reshape(1)
        angles = t * self.frequencies.to(dtype)
        time_feats = torch.cat([t, torch.sin(angles), torch.cos(angles)]).expand(flat.shape[0], -1)
        return torch.cat([flat, time_feats], dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return self.net(self.features(x, t)).reshape(x.shape).to(x.dtype)


class ToyControlledFlow(PlainBaseVJP, nn.Module):
    """A :class:`~diffusers_am.flow.ConditionedFlow` on the toy: base_velocity = b,
    velocity = b + u_theta(x, t) for t >= control_start (the control window [t_s, 1]), b elsewhere."""

    def __init__(self, toy: GaussianToy, control: nn.Module | None = None, control_start: float = 0.0) -> None:
        super().__init__()
        self.toy = toy
        self.control = control if control is not None else MLPControl()
        self.control_start = _check_unit_interval(control_start, "control_start")

    def base_velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.toy.base_velocity(x, t)

    def control_value(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """u_theta(x, t) inside the window, 0 before it; [B, ...]."""
        if float(t) < self.control_start:
            return torch.zeros_like(x)
        return self.control(x, t)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.base_velocity(x, t) + self.control_value(x, t)


class ClosedFormControl(nn.Module):
    """The time-only control u*(t) of ``order`` as a module (x [B, ...], 0-dim t) -> [B, ...]:
    the target a trained :class:`MLPControl` should reach; no parameters."""

    def __init__(self, toy: GaussianToy, order: float = 2.0) -> None:
        super().__init__()
        self.toy = toy
        self.order = check_order(order)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        u = self.toy.optimal_control(_time(t).to(torch.float64), self.order)
        return torch.full_like(x, float(u))
