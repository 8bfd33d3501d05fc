"""Lambda at matched control size: compare orders p and ODE / SDE at the same strength (pure torch).

At the same reward scale lambda, methods ask for very different controls: ODE-AM of order p targets
|u*| = |a~|^(1/(p-1)) (p = 4 shrinks a large adjoint, p = 6 more so), and memoryless SDE-AM changes the
velocity by sigma^2 |a~| / 2 = (1 - t) / t |a~|, small near t = 1 where truncated AM trains. Reading
``lambda`` as "the lambda of 2nd-order ODE-AM" and rescaling it per method makes a sweep compare methods
at the same strength.

The size of one sample's target over the training window (the last K sampling steps, paper time) is one of

* ``"velocity"``: the dt-weighted RMS of the target velocity change |v*_theta - b| (what the LoRA must learn),
  sqrt( sum_k dt_k |dv*_k|^2 / sum_k dt_k );
* ``"reward_gain"``: the first-order reward gain of the target control, sum_k e_k / lambda
  (e_k = :meth:`~diffusers_am.probe.ControlProfile.energy`);

and the batch's size is the ``median`` (default), ``mean`` or ``rms`` over its samples. Reward gradients are
heavy-tailed across samples (a confidently classified sample has almost none, a misclassified one a large one),
and the matched lambda of order p moves with the (p - 2)-th power of the adjoint's size, so a batch RMS is
dominated by a sample or two; the median is the typical sample. Every choice is positively homogeneous, so the
size grows as lambda^q (q = 1 / (p - 1) for ODE-AM, 1 for SDE-AM) and the matching lambda is closed form in a
probe's adjoint norms:  lambda = (S_ref / S_target(lambda = 1))^(1/q).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .errors import UserError
from .checks import one_of, positive_float
from .flow import check_truncation
from .probe import ControlProfile

STATISTICS = ("velocity", "reward_gain")
REDUCTIONS = ("median", "mean", "rms")


def _window_mask(profile: ControlProfile, truncate_steps: int) -> torch.Tensor:
    n = profile.num_steps
    return profile.step_index >= n - check_truncation(truncate_steps, n)


def sample_sizes(profile: ControlProfile, truncate_steps: int, statistic: str = "velocity") -> torch.Tensor:
    """[B] each sample's target size over the last ``truncate_steps`` sampling steps (module docstring)."""
    mask = _window_mask(profile, truncate_steps)
    dt = profile.dt[mask]
    if one_of(statistic, "statistic", STATISTICS) == "velocity":
        sq = profile.velocity_change()[mask].pow(2)
        return ((dt[:, None] * sq).sum(0) / dt.sum()).sqrt()
    return profile.energy()[mask].sum(0) / profile.reward_scale  # "reward_gain"


def control_size(
    profile: ControlProfile, truncate_steps: int, statistic: str = "velocity", reduction: str = "median"
) -> float:
    """The batch's target size: ``reduction`` over :func:`sample_sizes`."""
    sizes = sample_sizes(profile, truncate_steps, statistic)
    reduction = one_of(reduction, "reduction", REDUCTIONS)
    if reduction == "median":
        return float(sizes.median())
    if reduction == "mean":
        return float(sizes.mean())
    return float(sizes.pow(2).mean().sqrt())  # "rms"


def matched_reward_scale(
    reference: ControlProfile,
    target: ControlProfile,
    *,
    reference_scale: float,
    truncate_steps: int,
    reference_steps: int | None = None,
    statistic: str = "velocity",
    reduction: str = "median",
) -> float:
    """The lambda at which ``target``'s method asks for the control size ``reference`` asks for at
    ``reference_scale``.

    Args:
        reference: the reference method's probe (usually 2nd-order ODE-AM: ``target.with_order(2)`` for an
            ODE-AM target, whose adjoint does not depend on p; a separate ODE probe for an SDE-AM target).
        target: the probe of the method to rescale (any probe lambda: profiles rescale exactly).
        reference_scale: the reference lambda (the user's ``--reward_scale``).
        truncate_steps: K of the target's window.
        reference_steps: K of the reference window (default: ``truncate_steps``).
        statistic: ``"velocity"`` or ``"reward_gain"``; reduction: ``"median"``, ``"mean"`` or ``"rms"``
            over the batch (module docstring).
    Returns:
        the matched lambda (> 0). For an ODE-AM p = 2 target measured on the reference's batch, it is
        ``reference_scale`` itself.
    """
    lam = positive_float(reference_scale, "reference_scale")
    ref_size = control_size(_float64(reference).at(lam), reference_steps or truncate_steps, statistic, reduction)
    # the target is measured in float64 at the lambda where its median sample's largest adjoint norm over the
    # window is 1: at lambda = 1 the control |a~|^(1/(p-1)) of an order p close to 1 overflows (p = 1.01,
    # |a~| = 5: 5^100), and relative to the largest sample the typical one underflows
    target = _float64(target)
    typical = float(target.adjoint_norms[_window_mask(target, truncate_steps)].amax(0).median())
    probe_scale = target.reward_scale / typical if typical > 0 else 1.0
    probe_size = control_size(target.at(probe_scale), truncate_steps, statistic, reduction)
    if not (ref_size > 0 and probe_size > 0):
        raise UserError(
            "cannot match lambda: the probe's reward gradient is zero over the window (the control it asks for "
            "is zero); probe another batch or set --reward_scale directly."
        )
    if not (math.isfinite(ref_size) and math.isfinite(probe_size)):
        raise UserError(
            f"cannot match lambda: the {reduction} control size of order p = {target.order:g} overflows even in "
            "float64 (its samples' adjoints differ too much for |a~|^(1/(p-1))); use the median, or a larger p."
        )
    return math.exp(math.log(probe_scale) + (math.log(ref_size) - math.log(probe_size)) / target.scale_exponent)


def _float64(profile: ControlProfile) -> ControlProfile:
    """``profile`` with its adjoint norms in float64 (powers 1 / (p - 1) of them stay finite)."""
    return dataclasses.replace(profile, adjoint_norms=profile.adjoint_norms.double())
