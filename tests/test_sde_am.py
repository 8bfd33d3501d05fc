"""SDE-AM on the Gaussian toy: the memoryless drift 2 v - x / t, the control u = 2 (v_theta - v_base) / sigma
inside ``sde_am_step``, its lean adjoint against the closed form, and the reward tilt it targets."""

import numpy as np
import pytest
import torch
from torch import nn

from diffusers_am.flow import sample_euler
from diffusers_am.objectives import sde_am_step
from diffusers_am.schedules import MemorylessSchedule, NoiseSchedule
from diffusers_am.toy.gaussian import GaussianToy, MLPControl, ToyControlledFlow

SCHEDULE = MemorylessSchedule()


class VelocityOffset(nn.Module):
    """v_theta - v_base = offset(t), a known time-only control in velocity units."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def forward(self, x, t):
        return torch.full_like(x, float(self.offset(torch.as_tensor(t, dtype=torch.float64))))


def sde_optimal_offset(toy, t):
    """The velocity offset whose SDE control 2 (v_theta - v_base) / sigma is u*_sde(t)."""
    return SCHEDULE.sigma(t) * toy.sde_optimal_control(t) / 2


def euler_sde_adjoint(toy, times):
    """Exact discrete lean adjoint of Euler-Maruyama with the memoryless base drift (x-independent)."""
    t = times.double()
    factors = 1 + (t[1:] - t[:-1]) * (2 * toy.alpha(t[:-1]) - 1 / SCHEDULE.clip(t[:-1]))
    tail = torch.flip(torch.cumprod(torch.flip(factors, [0]), 0), [0])
    return toy.terminal_adjoint * torch.cat([tail, torch.ones(1, dtype=torch.float64)])


def test_memoryless_drift_is_2v_minus_x_over_t_on_the_toy():
    toy = GaussianToy(mean=0.4, std=0.7)
    x = torch.randn(16, 1, dtype=torch.float64)
    for t in torch.linspace(0.05, 0.99, 12, dtype=torch.float64):
        v = toy.base_velocity(x, t)
        torch.testing.assert_close(SCHEDULE.drift(x, v, t), 2 * v - x / t)
        torch.testing.assert_close(SCHEDULE.sigma(t) ** 2, 2 * (1 - t) / t)
        # the closed-form overrides agree with the general b_sigma = v + sigma^2/2 * score formula
        torch.testing.assert_close(NoiseSchedule.velocity_gain(SCHEDULE, t), torch.tensor(2.0, dtype=torch.float64))
        torch.testing.assert_close(NoiseSchedule.state_coeff(SCHEDULE, t), 1 / t)


def test_memoryless_sde_keeps_the_toy_marginals():
    toy = GaussianToy(mean=0.8, std=0.5)
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64).requires_grad_(True)
    d = toy.variance(t)
    (d_prime,) = torch.autograd.grad(d.sum(), t)
    with torch.no_grad():
        drift_gain = 2 * toy.alpha(t) - 1 / t  # d drift / d x
        mean = t * toy.mean
        torch.testing.assert_close(SCHEDULE.drift(mean, toy.base_velocity(mean, t), t), torch.full_like(t, toy.mean))
        torch.testing.assert_close(2 * drift_gain * d + SCHEDULE.sigma2(t), d_prime)
    t0 = 0.05
    times = torch.linspace(t0, 1.0, 801, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x0 = t0 * toy.mean + float(toy.variance(t0)) ** 0.5 * torch.randn(20000, 1, generator=gen, dtype=torch.float64)
    drift = lambda x, t: SCHEDULE.drift(x, toy.base_velocity(x, t), t)  # noqa: E731
    x1 = sample_euler(drift, x0, times, noise_std=SCHEDULE.sigma, generator=gen)[-1]
    assert abs(float(x1.mean()) - toy.mean) < 0.02
    assert abs(float(x1.std()) - toy.std) < 0.03


def test_sde_lean_adjoint_closed_form_and_the_reward_tilt():
    toy = GaussianToy(mean=0.5, std=0.6, reward_slope=1.5, reward_scale=0.8)
    # a~' = -(2 alpha - 1/t) a~ with a~(1) = -lambda c
    t = torch.linspace(0.05, 1.0, 20, dtype=torch.float64).requires_grad_(True)
    a = toy.sde_lean_adjoint(t)
    (a_prime,) = torch.autograd.grad(a.sum(), t)
    with torch.no_grad():
        torch.testing.assert_close(a_prime, -(2 * toy.alpha(t) - 1 / t) * a)
    assert float(toy.sde_lean_adjoint(1.0)) == pytest.approx(toy.terminal_adjoint)
    # memoryless optimum: the fine-tuned law is N(m + lambda c s^2, s^2), the reward-tilted base law
    nodes, weights = np.polynomial.legendre.leggauss(200)
    tq = torch.as_tensor((nodes + 1) / 2, dtype=torch.float64)
    exact = MemorylessSchedule(t_min=1e-12)  # no clip near t = 0 for the identity
    control = toy.sde_optimal_control(tq, exact)
    shift = float((torch.as_tensor(weights / 2) * toy.sde_propagator(tq) * exact.sigma(tq) * control).sum())
    assert shift == pytest.approx(toy.reward_scale * toy.reward_slope * toy.std**2, rel=1e-6)


def test_controlled_sde_shifts_the_mean_as_the_closed_form_predicts():
    toy = GaussianToy(mean=0.5, std=0.5)
    t0 = 0.1
    times = torch.linspace(t0, 1.0, 1001, dtype=torch.float64)
    flow = ToyControlledFlow(toy, VelocityOffset(lambda t: sde_optimal_offset(toy, t)))
    x0 = torch.randn(8, 1, dtype=torch.float64)

    def run(velocity):
        drift = lambda x, t: SCHEDULE.drift(x, velocity(x, t), t)  # noqa: E731
        return sample_euler(drift, x0, times, noise_std=SCHEDULE.sigma, generator=torch.Generator().manual_seed(3))[-1]

    shift = float((run(flow.velocity) - run(flow.base_velocity)).mean())  # same noise: exact difference
    nodes, weights = np.polynomial.legendre.leggauss(200)
    tq = torch.as_tensor(t0 + (1 - t0) * (nodes + 1) / 2, dtype=torch.float64)
    w = torch.as_tensor(weights * (1 - t0) / 2)
    closed = float((w * toy.sde_propagator(tq) * SCHEDULE.sigma(tq) * toy.sde_optimal_control(tq)).sum())
    assert shift == pytest.approx(closed, rel=1e-2)


def test_sde_am_control_is_2_velocity_difference_over_sigma():
    toy = GaussianToy(mean=0.5, std=0.5, reward_slope=2.0, reward_scale=0.5)
    times = torch.linspace(0.2, 1.0, 17)
    k = 8
    window = times[-k - 1 :].double()
    flow = ToyControlledFlow(toy, VelocityOffset(lambda t: sde_optimal_offset(toy, t)))
    noise = torch.randn(6, 1)
    no_params = lambda loss: None  # noqa: E731  (a fixed control: nothing to train)
    out = sde_am_step(flow, noise, times, toy.reward, truncate_steps=k, reward_scale=toy.reward_scale,
                      generator=torch.Generator().manual_seed(0), backward=no_params)
    sigma = SCHEDULE.sigma(window[:-1])
    offset = sde_optimal_offset(toy, window[:-1])
    expected_u = 2 * offset / sigma
    torch.testing.assert_close(expected_u, toy.sde_optimal_control(window[:-1]))
    torch.testing.assert_close(out.control_norm_per_step.double(), expected_u.abs(), rtol=1e-4, atol=1e-6)
    # the loss is (1/K) sum_k |u_k + sigma_k a~_k|^2 with the discrete adjoint of the memoryless drift
    a = euler_sde_adjoint(toy, window)[:-1]
    expected_loss = float(((expected_u + sigma * a) ** 2).mean())
    assert out.loss == pytest.approx(expected_loss, rel=1e-3, abs=1e-7)
    assert expected_loss < 1e-2 * float((expected_u**2).mean())  # the closed form is (nearly) optimal

    zero = ToyControlledFlow(toy, VelocityOffset(lambda t: torch.zeros(())))
    out0 = sde_am_step(
        zero, noise, times, toy.reward, truncate_steps=k, reward_scale=toy.reward_scale, backward=no_params
    )
    assert float(out0.control_norm_per_step.abs().max()) < 1e-6  # v_base is rebuilt from the drift in fp32
    assert out0.loss == pytest.approx(float(((sigma * a) ** 2).mean()), rel=1e-4)


def test_short_sde_am_training_converges_to_the_discrete_optimum():
    toy = GaussianToy(mean=1.0, std=0.5)
    times = torch.linspace(0.1, 1.0, 19)
    k = 6
    gen = torch.Generator().manual_seed(0)
    flow = ToyControlledFlow(toy, MLPControl(hidden=16))
    opt = torch.optim.Adam(flow.parameters(), lr=2e-2, betas=(0.9, 0.99))
    losses = []
    for _ in range(60):
        opt.zero_grad()
        start = 0.1 * toy.mean + float(toy.variance(0.1)) ** 0.5 * torch.randn(16, 1, generator=gen)
        out = sde_am_step(flow, start, times, toy.reward, truncate_steps=k, generator=gen)
        opt.step()
        losses.append(out.loss)
    assert losses[-1] < 0.05 * losses[0]
    window = times[-k - 1 :].double()
    sigma = SCHEDULE.sigma(window[:-1])
    target = -sigma * euler_sde_adjoint(toy, window)[:-1]  # optimal SDE control on this grid
    learned = out.control_norm_per_step.double()  # |u| batch means of the last update
    assert float((learned - target).norm() / target.norm()) < 0.05
    continuous = toy.sde_optimal_control(window[:-1])
    assert float((learned - continuous).norm() / target.norm()) < 0.12  # Euler's O(dt) gap alone is 7.7%
