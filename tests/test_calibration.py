"""Lambda at matched control size, against the Gaussian toy's closed forms (ODE-AM of order p, memoryless SDE-AM)."""

import numpy as np
import pytest
import torch

from diffusers_am.calibration import control_size, matched_reward_scale, sample_sizes
from diffusers_am.probe import ControlProfile, probe_control_profile
from diffusers_am.schedules import MemorylessSchedule
from diffusers_am.toy.gaussian import GaussianToy, ToyControlledFlow
from diffusers_am.toy.gaussian_fit import control_error, train_toy_control, uniform_grid

N = 1000


class ZeroControl(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def _probe(toy, n=N, schedule=None, reward_scale=1.0, order=2.0):
    return probe_control_profile(
        ToyControlledFlow(toy, ZeroControl()), torch.randn(2, 1, dtype=torch.float64), uniform_grid(n).double(),
        toy.reward, order=order, reward_scale=reward_scale, schedule=schedule,
        generator=torch.Generator().manual_seed(0),
    )


def _rms(values_of_t, t_s):
    """sqrt( int_{t_s}^1 f(t)^2 dt / (1 - t_s) ) by Gauss-Legendre, f a function of a [T] fp64 tensor."""
    nodes, weights = np.polynomial.legendre.leggauss(200)
    t = torch.as_tensor(t_s + (1 - t_s) * (nodes + 1) / 2, dtype=torch.float64)
    w = torch.as_tensor(weights / 2, dtype=torch.float64)
    return float((w * values_of_t(t).pow(2)).sum().sqrt())


@pytest.mark.parametrize("k", [1, 4, 20])
def test_second_order_ode_target_keeps_the_reference_lambda(k):
    prof = _probe(GaussianToy(std=0.6), n=20, reward_scale=3.0)
    assert matched_reward_scale(prof, prof, reference_scale=7.0, truncate_steps=k) == pytest.approx(7.0)
    assert matched_reward_scale(prof, prof, reference_scale=7.0, truncate_steps=k, statistic="reward_gain") == (
        pytest.approx(7.0)
    )


@pytest.mark.parametrize("order", [4.0, 6.0])
@pytest.mark.parametrize("t_s", [0.8, 0.0])
def test_ode_matched_lambda_equals_the_closed_form(order, t_s):
    # velocity change of ODE-AM = u*(t) = phi_p(a~(t)), a~ = -lambda c s / sqrt(D): lambda_p solves
    # rms_{[t_s, 1]} u*_p(lambda_p) = rms_{[t_s, 1]} u*_2(lambda_ref)
    toy = GaussianToy(mean=1.0, std=0.5, reward_slope=0.8)
    ref_lambda = 5.0
    prof = _probe(toy)
    k = round(N * (1 - t_s))
    lam = matched_reward_scale(prof.with_order(2), prof.with_order(order), reference_scale=ref_lambda, truncate_steps=k)
    ref = _rms(lambda t: GaussianToy(1.0, 0.5, 0.8, ref_lambda).optimal_control(t, 2.0), t_s)
    unit = _rms(lambda t: GaussianToy(1.0, 0.5, 0.8, 1.0).optimal_control(t, order), t_s)
    closed = (ref / unit) ** (order - 1)
    assert lam == pytest.approx(closed, rel=1e-2)
    # and the target sizes do match at it
    sizes = [control_size(prof.with_order(2).at(ref_lambda), k), control_size(prof.with_order(order).at(lam), k)]
    assert sizes[1] == pytest.approx(sizes[0], rel=1e-9)


def test_sde_matched_lambda_equals_the_closed_form():
    # memoryless SDE-AM changes the velocity by sigma u* / 2 = sigma^2 |a~_sde| / 2, a~_sde = -lambda c s^2 t / D
    toy = GaussianToy(mean=1.0, std=0.5, reward_slope=0.8)
    schedule = MemorylessSchedule()
    t_s, ref_lambda = 0.8, 5.0
    k = round(N * (1 - t_s))
    sde = _probe(toy, schedule=schedule)
    lam = matched_reward_scale(_probe(toy), sde, reference_scale=ref_lambda, truncate_steps=k)
    ref = _rms(lambda t: GaussianToy(1.0, 0.5, 0.8, ref_lambda).optimal_control(t, 2.0), t_s)
    unit = _rms(lambda t: schedule.sigma(t) * toy.sde_optimal_control(t, schedule) / 2, t_s)
    assert lam == pytest.approx(ref / unit, rel=1e-2)
    assert lam > ref_lambda  # near t = 1 the memoryless SDE moves the velocity less at the same lambda


@pytest.mark.parametrize("order, t_s", [(2.0, 0.0), (2.0, 0.7), (4.0, 0.7), (6.0, 0.5)])
def test_reward_gain_statistic_is_the_toys_terminal_mean_shift(order, t_s):
    # first-order reward gain of u* on [t_s, 1] = c * (shift of E X_1), exact on the linear toy
    toy = GaussianToy(mean=1.0, std=0.5, reward_slope=0.8, reward_scale=3.0)
    prof = _probe(toy, reward_scale=3.0, order=order)
    gain = control_size(prof, round(N * (1 - t_s)), "reward_gain")
    assert gain == pytest.approx(toy.reward_slope * toy.terminal_mean_shift(order=order, window_start=t_s), rel=1e-2)


def test_training_at_the_matched_lambda_learns_controls_of_the_same_size():
    # ODE-AM of order 2 at lambda = 1 and order 4 at the matched lambda: the learned controls on the window
    # have the same RMS (at the raw lambda = 1 the 4th-order target is much larger: |a~| < 1 here)
    ref_toy = GaussianToy(mean=1.0, std=0.5, reward_slope=0.25, reward_scale=1.0)
    n, k = 20, 5
    times = uniform_grid(n)
    prof = _probe(ref_toy, n=n)
    lam = matched_reward_scale(prof, prof.with_order(4), reference_scale=1.0, truncate_steps=k)
    assert control_size(prof.with_order(4), k) > 2 * control_size(prof, k)
    sizes = []
    for toy, order in ((ref_toy, 2.0), (GaussianToy(1.0, 0.5, 0.25, lam), 4.0)):
        flow, _ = train_toy_control(
            toy, order=order, num_steps=n, truncate_steps=k, iterations=30, batch_size=16, lr=3e-2, seed=0
        )
        err = control_error(flow, times, k, order, batch_size=256, generator=torch.Generator().manual_seed(1))
        sizes.append(float(err.learned_mean.pow(2).mean().sqrt()))
    assert sizes[1] == pytest.approx(sizes[0], rel=0.03), sizes


def _heavy_tailed(scales):
    """An ODE profile over 4 steps whose samples have time-constant adjoint norms ``scales`` (at lambda = 1)."""
    scales = torch.tensor(scales, dtype=torch.float64)
    return ControlProfile(
        times=torch.linspace(0, 1, 5, dtype=torch.float64), step_index=torch.arange(4), num_steps=4,
        adjoint_norms=scales[None].expand(4, -1).clone(), reward_scale=1.0,
    )


@pytest.mark.parametrize("reduction", ["median", "mean", "rms"])
@pytest.mark.parametrize("statistic", ["velocity", "reward_gain"])
def test_every_reduction_matches_exactly_and_the_median_ignores_outliers(reduction, statistic):
    prof = _heavy_tailed([0.01, 0.1, 1.0, 3.0, 100.0])
    kw = dict(reference_scale=10.0, truncate_steps=2, statistic=statistic, reduction=reduction)
    lam = matched_reward_scale(prof, prof.with_order(4), **kw)
    ref = control_size(prof.at(10.0), 2, statistic, reduction)
    assert control_size(prof.with_order(4).at(lam), 2, statistic, reduction) == pytest.approx(ref, rel=1e-9)
    torch.testing.assert_close(sample_sizes(prof.at(10.0), 2, statistic), sample_sizes(prof, 2, statistic) * 10)
    wild = _heavy_tailed([0.01, 0.1, 1.0, 3.0, 1e4])
    outlier = matched_reward_scale(wild, wild.with_order(4), **kw)
    if reduction == "median":  # constant per-sample sizes: lambda_4 = lambda_ref^3 median(|a|)^2, the outlier ignored
        assert lam == pytest.approx(1000.0) and outlier == pytest.approx(lam)
    else:  # the largest sample sets the scale: (p - 2) = 2 powers of it
        assert outlier > 100 * lam


def test_matching_rejects_bad_input():
    prof = _probe(GaussianToy(), n=10)
    with pytest.raises(ValueError, match="truncate_steps"):
        matched_reward_scale(prof, prof, reference_scale=1.0, truncate_steps=11)
    with pytest.raises(ValueError, match="statistic"):
        control_size(prof, 3, "energy")
    with pytest.raises(ValueError, match="reduction"):
        control_size(prof, 3, "velocity", "max")
    with pytest.raises(ValueError, match="reference_scale"):
        matched_reward_scale(prof, prof, reference_scale=-1.0, truncate_steps=3)
    flat = probe_control_profile(
        ToyControlledFlow(GaussianToy(), ZeroControl()), torch.randn(2, 1), uniform_grid(10), lambda x: x.sum(1) * 0.0
    )
    with pytest.raises(ValueError, match="zero"):
        matched_reward_scale(prof, flat, reference_scale=1.0, truncate_steps=3)


@pytest.mark.parametrize("k", [2, 3])
def test_velocity_statistic_is_the_time_weighted_rms_over_the_window(k):
    """On a non-uniform grid the velocity statistic is sqrt(sum_k dt_k |dv_k|^2 / sum_k dt_k) over the last k
    steps (module docstring), each sample on its own; p = 2, so |dv_k| = |a~_k|."""
    times = torch.tensor([0.0, 0.5, 0.6, 1.0], dtype=torch.float64)
    norms = torch.tensor([[1.0, 2.0], [3.0, 0.5], [0.2, 4.0]], dtype=torch.float64)  # [M=3 steps, B=2]
    profile = ControlProfile(times=times, step_index=torch.arange(3), num_steps=3, adjoint_norms=norms,
                             reward_scale=1.0, order=2.0)
    dt = [0.5, 0.1, 0.4][3 - k:]
    rows = norms[3 - k:].tolist()
    expected = [(sum(d * r[b] ** 2 for d, r in zip(dt, rows)) / sum(dt)) ** 0.5 for b in range(2)]
    torch.testing.assert_close(sample_sizes(profile, k, "velocity"), torch.tensor(expected, dtype=torch.float64))
