"""Adaptive truncation: choose the window K from where the optimal control acts (pure python / torch).

The rule: the smallest terminal window holding a share ``q`` of the control energy,

    K(q) = min { K : sum_{k=N-K}^{N-1} e_k >= q * sum_{k=0}^{N-1} e_k },   clipped to [K_min, K_max],

with e_k = dt_k |u*_k|^p the first-order terminal-cost decrease the optimal control earns at step k
(:meth:`diffusers_am.probe.ControlProfile.energy_per_step`). So AM-K(q) trains where a share q of the
optimal control's first-order reward gain is made. The share of e does not depend on lambda (e scales as
lambda^(p/(p-1)) at every step), so K(q) does not either.

:class:`AdaptiveTruncation` keeps the state a trainer needs: it says when a probe is due (every
``refresh_every`` updates), smooths the normalised energy profile over probes, and round-trips through a
JSON-able ``state_dict`` for checkpoint / resume.

Default share 0.3: on the Gaussian toy (s = 0.5) it gives the last 20% of the steps, where the paper finds the
reward gain saturating (about 10 of 50); on the embedded digits base (N = 20) it gives K = 5-7, whose held-out
reward equals fixed AM-4 .. AM-8's. A larger share buys little there: the LoRA is shared over t, so training the
last K steps also moves the control before them, and the reward saturates well before the energy share does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .errors import UserError
from .checks import int_at_least

DEFAULT_SHARE = 0.3
DEFAULT_REFRESH_EVERY = 10
DEFAULT_SMOOTHING = 0.5


def check_share(share: Any) -> float:
    """A share of the control energy: a number in (0, 1]."""
    try:
        q = float(share)
    except (TypeError, ValueError):
        raise UserError(f"`share` must be a number in (0, 1] (e.g. 0.3); got {share!r}.") from None
    if not (0.0 < q <= 1.0):
        raise UserError(f"`share` must be a number in (0, 1] (e.g. 0.3); got {share!r}.")
    return q


def check_bounds(num_steps: int, min_steps: int = 1, max_steps: int | None = None) -> tuple[int, int]:
    """(K_min, K_max) with 1 <= K_min <= K_max <= N; ``max_steps=None`` means N."""
    n = int_at_least(num_steps, "num_steps", 1)
    lo = int_at_least(min_steps, "min_steps", 1)
    hi = n if max_steps is None else int_at_least(max_steps, "max_steps", 1)
    if not lo <= hi <= n:
        raise UserError(
            f"adaptive truncation needs 1 <= min_steps <= max_steps <= num_inference_steps; got min_steps={lo}, "
            f"max_steps={hi}, num_inference_steps={n}."
        )
    return lo, hi


def window_for_share(
    energy: torch.Tensor, share: float = DEFAULT_SHARE, *, min_steps: int = 1, max_steps: int | None = None
) -> int:
    """The smallest terminal window K holding ``share`` of ``energy``, clipped to [min_steps, max_steps].

    Args:
        energy: [N] non-negative per-step control energy, oldest step first (any scale).
        share: q in (0, 1] (default 0.3); q = 1 gives the window from the first step with non-zero energy.
        min_steps, max_steps: K_min and K_max (default 1 and N).
    Returns:
        K. An all-zero energy (no control wanted anywhere) gives ``min_steps``, the cheapest window.
    """
    if not isinstance(energy, torch.Tensor) or energy.dim() != 1 or energy.numel() < 1:
        raise UserError(f"`energy` must be a 1-D tensor of N >= 1 per-step energies; got {energy!r}.")
    e = energy.detach().double().cpu()
    if not torch.isfinite(e).all() or (e < 0).any():
        raise UserError(f"`energy` must be finite and >= 0; got {e.tolist()}.")
    q = check_share(share)
    lo, hi = check_bounds(e.numel(), min_steps, max_steps)
    total = float(e.sum())
    if total == 0.0:
        return lo
    tail = torch.cumsum(torch.flip(e, [0]), 0)  # tail[K-1] = energy of the last K steps
    needed = q * total * (1.0 - 1e-12)  # q = 1 must not fail on rounding
    k = int(torch.nonzero(tail >= needed)[0, 0]) + 1
    return min(max(k, lo), hi)


class AdaptiveTruncation:
    """The adaptive window of one run: K, the smoothed energy profile, and when to probe again.

    Args:
        num_steps: N sampling steps.
        share: q, the share of the control energy the window must hold (default 0.3).
        min_steps, max_steps: bounds K_min, K_max on the window (default 1 and N).
        refresh_every: R, probe again after this many updates (the first probe is due at update 0).
        smoothing: EMA weight of the previous profile when a new probe arrives (0: use the newest only).
    """

    def __init__(
        self,
        num_steps: int,
        *,
        share: float = DEFAULT_SHARE,
        min_steps: int = 1,
        max_steps: int | None = None,
        refresh_every: int = DEFAULT_REFRESH_EVERY,
        smoothing: float = DEFAULT_SMOOTHING,
    ) -> None:
        self.num_steps = int_at_least(num_steps, "num_steps", 1)
        self.share = check_share(share)
        self.min_steps, self.max_steps = check_bounds(num_steps, min_steps, max_steps)
        self.refresh_every = int_at_least(refresh_every, "refresh_every", 1)
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
            raise UserError(f"`smoothing` must be a number in [0, 1); got {smoothing!r}.")
        self.smoothing = float(smoothing)
        self.steps: int | None = None  # K in force; None until the first probe
        self.profile: torch.Tensor | None = None  # [N] smoothed energy share, sums to 1
        self.last_probe: int | None = None  # the update index of the last probe
        self.history: list[tuple[int, int]] = []  # (update index, K chosen)

    def due(self, update: int) -> bool:
        """Whether a probe should run before update ``update`` (0-based)."""
        return self.last_probe is None or update - self.last_probe >= self.refresh_every

    def update(self, energy_per_step: torch.Tensor, update: int) -> int:
        """Fold in a probe's [N] per-step energy taken before update ``update``; returns the new K."""
        if not isinstance(energy_per_step, torch.Tensor) or energy_per_step.shape != (self.num_steps,):
            raise UserError(
                f"`energy_per_step` must have shape [{self.num_steps}] (one value per sampling step); "
                f"got {getattr(energy_per_step, 'shape', energy_per_step)!r}."
            )
        e = energy_per_step.detach().double().cpu()
        if not torch.isfinite(e).all() or (e < 0).any():
            raise UserError(f"`energy_per_step` must be finite and >= 0; got {e.tolist()}.")
        total = float(e.sum())
        share = e / total if total > 0 else e
        if self.profile is not None and total > 0:
            share = self.smoothing * self.profile + (1.0 - self.smoothing) * share
        elif self.profile is not None:
            share = self.profile  # a probe without signal keeps the last profile
        self.profile = share
        self.steps = window_for_share(share, self.share, min_steps=self.min_steps, max_steps=self.max_steps)
        self.last_probe = int(update)
        self.history.append((int(update), self.steps))
        return self.steps

    # -- checkpoint / resume ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (settings included, to detect a resume under other settings)."""
        return {
            "num_steps": self.num_steps,
            "share": self.share,
            "min_steps": self.min_steps,
            "max_steps": self.max_steps,
            "refresh_every": self.refresh_every,
            "smoothing": self.smoothing,
            "steps": self.steps,
            "profile": None if self.profile is None else self.profile.tolist(),
            "last_probe": self.last_probe,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. Raises ValueError when N differs (the profile would not fit);
        other settings are taken from this object (a resume may change them)."""
        if int(state.get("num_steps", -1)) != self.num_steps:
            raise UserError(
                f"the checkpoint's adaptive truncation was for num_inference_steps={state.get('num_steps')}, "
                f"this run has {self.num_steps}: resume with the same --num_inference_steps."
            )
        profile = state.get("profile")
        if profile is not None:
            profile = torch.tensor(profile, dtype=torch.float64)
            if profile.shape != (self.num_steps,) or not all(math.isfinite(v) for v in profile.tolist()):
                raise UserError("the checkpoint's adaptive-truncation profile is malformed.")
        self.profile = profile
        self.last_probe = None if state.get("last_probe") is None else int(state["last_probe"])
        self.history = [(int(u), int(k)) for u, k in state.get("history", [])]
        self.steps = (
            None if profile is None
            else window_for_share(profile, self.share, min_steps=self.min_steps, max_steps=self.max_steps)
        )
