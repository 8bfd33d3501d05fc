"""The statistics of ``paper_claims.py``, in plain Python (no scipy): Student's t distribution, the paired
t test, Holm's step-down correction, linear interpolation along a curve and leave-one-seed-out choice.

Conventions: a *paired difference* is one number per seed, positive in the claimed direction unless the
caller says otherwise; ``alternative`` is "greater" (the claim: mean > 0), "less" (mean < 0) or
"two-sided". p-values are exact for the t distribution (the regularized incomplete beta function by its
continued fraction), not normal approximations.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

ALTERNATIVES = ("greater", "less", "two-sided")


# -- the t distribution ------------------------------------------------------------------------------------
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), valid for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 10_000):
        # the even step d_{2m}, then the odd step d_{2m+1}
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < eps:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"regularized_incomplete_beta needs a, b > 0; got a={a}, b={b}.")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"regularized_incomplete_beta needs 0 <= x <= 1; got x={x}.")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf needs df > 0; got {df}.")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
    """The t with t_cdf(t, df) = q (bisection to 1e-12), 0 < q < 1."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_quantile needs 0 < q < 1; got {q}.")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > q:
        lo *= 2.0
    while t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


# -- tests --------------------------------------------------------------------------------------------------
def paired_t(diffs: Sequence[float], alternative: str = "greater") -> dict:
    """One-sample t test of per-seed paired differences against 0, df = n - 1.

    Returns mean, sd, se, n, df, t, p (for ``alternative``), the effect size d_z = mean / sd (Cohen's d of
    paired data) and the differences themselves. With n < 2 or sd = 0 and mean = 0, p is NaN."""
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}; got {alternative!r}.")
    values = [float(v) for v in diffs]
    n = len(values)
    out = {"n": n, "df": n - 1, "diffs": values, "alternative": alternative}
    if n < 2:
        return {**out, "mean": values[0] if values else math.nan, "sd": math.nan, "se": math.nan, "t": math.nan,
                "p": math.nan, "d": math.nan}
    mean, sd = statistics.mean(values), statistics.stdev(values)
    se = sd / math.sqrt(n)
    if se == 0.0:
        t = math.nan if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    if math.isnan(t):
        p = math.nan
    elif alternative == "greater":
        p = 1.0 - t_cdf(t, n - 1)
    elif alternative == "less":
        p = t_cdf(t, n - 1)
    else:
        p = min(1.0, 2.0 * (1.0 - t_cdf(abs(t), n - 1)))
    d = mean / sd if sd > 0 else (math.nan if mean == 0 else math.copysign(math.inf, mean))
    return {**out, "mean": mean, "sd": sd, "se": se, "t": t, "p": p, "d": d}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; NaN stays NaN and is not counted).

    Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    Rejecting where adjusted p <= alpha controls the family-wise error rate at alpha."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    order = sorted(idx, key=lambda i: pvalues[i])
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def seeds_needed(d: float, alpha: float, power: float = 0.8, max_n: int = 10_000) -> int | None:
    """The smallest n whose one-sided paired t test at level ``alpha`` detects a true effect of size |d|
    (= mean / sd) with probability ``power``, by the usual approximation n >= ((t_{1-alpha, n-1} +
    t_{power, n-1}) / |d|)^2. None when d is 0 or NaN, or n would exceed ``max_n``."""
    if not math.isfinite(d) or d == 0:
        return None
    for n in range(2, max_n + 1):
        need = ((t_quantile(1 - alpha, n - 1) + t_quantile(power, n - 1)) / abs(d)) ** 2
        if n >= need:
            return n
    return None


# -- curves -------------------------------------------------------------------------------------------------
def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """y at ``x`` on the piecewise-linear curve through ``points`` (x, y), sorted by x here; None when x lies
    outside [min x, max x] (no extrapolation). Equal x's are averaged first."""
    merged: dict[float, list[float]] = {}
    for px, py in points:
        merged.setdefault(float(px), []).append(float(py))
    pts = sorted((px, statistics.mean(ys)) for px, ys in merged.items())
    if not pts or not (pts[0][0] <= x <= pts[-1][0]):
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]  # a single point equal to x


def leave_one_out_choice(options: Sequence[str], seeds: Sequence[int],
                         score: Callable[[str, int], float]) -> dict[int, str]:
    """For each seed s, the option with the highest mean ``score(option, seed)`` over the *other* seeds (ties:
    the first in ``options``): the choice scored on seed s never saw seed s."""
    if len(seeds) < 2:
        raise ValueError("leave_one_out_choice needs at least 2 seeds.")
    out = {}
    for s in seeds:
        others = [o for o in seeds if o != s]
        out[s] = max(options, key=lambda opt: (statistics.mean(score(opt, o) for o in others), -options.index(opt)))
    return out
