"""Precision, Recall, Density and Coverage (Kynkäänniemi et al., 2019; Naeem et al., 2020) in
chunked torch: no N x M distance matrix is ever held whole.

``real`` is the reference set (here: the base model's samples), ``fake`` the evaluated set (an
adapter's samples), both features [N, F]. Each point's k-NN radius is the distance to its k-th
nearest *other* point of its own set. Recall: share of real points inside some fake point's ball;
Coverage: share of real points whose ball holds at least one fake point. Precision and Density
are the mirrored quantities. Comparisons are strict (``<``), distances Euclidean in fp64.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..checks import int_at_least

DEFAULT_K = 5


def _check(features: torch.Tensor, name: str, k: int) -> torch.Tensor:
    if features.dim() != 2:
        raise UserError(f"`{name}` must be features [N, F]; got shape {tuple(features.shape)}.")
    if features.shape[0] <= k:
        raise UserError(f"`{name}` has {features.shape[0]} samples; k = {k} nearest neighbours need at least {k + 1}.")
    if not torch.isfinite(features).all():
        raise UserError(f"`{name}` has non-finite values.")
    return features.detach().to(torch.float64)


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K, chunk_size: int = 1024) -> torch.Tensor:
    """[N] distance of each row to its k-th nearest other row (self excluded)."""
    x = _check(features, "features", k)
    out = []
    for start in range(0, x.shape[0], chunk_size):
        d = torch.cdist(x[start : start + chunk_size], x)
        # the k+1 smallest include the point itself at distance 0
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(out)


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = DEFAULT_K, chunk_size: int = 1024) -> dict[str, float]:
    """{"precision", "recall", "density", "coverage"} of ``fake`` [M, F] against ``real`` [N, F]."""
    if real.dim() == 2 and fake.dim() == 2 and real.shape[1] != fake.shape[1]:
        raise UserError(f"`real` and `fake` feature widths differ: {real.shape[1]} vs {fake.shape[1]}.")
    int_at_least(k, "k", 1)
    r, f = _check(real, "real", k), _check(fake, "fake", k)
    f = f.to(r.device)
    r_rad, f_rad = knn_radii(r, k, chunk_size), knn_radii(f, k, chunk_size)
    real_in_fake_ball = torch.zeros(r.shape[0], dtype=torch.bool, device=r.device)
    real_ball_has_fake = torch.zeros_like(real_in_fake_ball)
    fake_in_real_ball = torch.zeros(f.shape[0], dtype=torch.bool, device=r.device)
    fake_ball_count = torch.zeros(f.shape[0], dtype=torch.float64, device=r.device)
    for start in range(0, r.shape[0], chunk_size):
        d = torch.cdist(r[start : start + chunk_size], f)  # [n, M]
        rows = slice(start, start + d.shape[0])
        real_in_fake_ball[rows] = (d < f_rad[None, :]).any(dim=1)
        real_ball_has_fake[rows] = d.min(dim=1).values < r_rad[rows]
        inside = d < r_rad[rows, None]
        fake_in_real_ball |= inside.any(dim=0)
        fake_ball_count += inside.sum(dim=0)
    return {
        "precision": fake_in_real_ball.double().mean().item(),
        "recall": real_in_fake_ball.double().mean().item(),
        "density": (fake_ball_count / k).mean().item(),
        "coverage": real_ball_has_fake.double().mean().item(),
    }


def recall_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = DEFAULT_K, chunk_size: int = 1024) -> dict[str, float]:
    """{"recall", "coverage"} of ``fake`` against ``real`` (the two mode-coverage numbers we report)."""
    out = prdc(real, fake, k, chunk_size)
    return {"recall": out["recall"], "coverage": out["coverage"]}
