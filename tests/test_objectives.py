"""The four objectives: truncation reaches only the last K steps, costs stay linear in K,
non-finite rewards stop an update before any backward, bad K is refused."""

import math

import pytest
import torch

from diffusers_am.adjoint import lean_adjoint
from diffusers_am.control import optimal_control
from diffusers_am.flow import ConditionedFlow, PlainBaseVJP
from diffusers_am.objectives import (
    NonFiniteRewardError,
    draft_step,
    matching_loss,
    ode_am_step,
    refl_step,
    sde_am_step,
)
from diffusers_am.schedules import ConstantSchedule, LinearSchedule, MemorylessSchedule, SineSchedule, get_schedule

N = 6


class StepwiseFlow(PlainBaseVJP, torch.nn.Module):
    """b(x, t) = -x + tanh(W x); the fine-tuned velocity adds theta[k] at grid step k, so a
    parameter's gradient tells which steps a loss reached. Counts model calls."""

    def __init__(self, times, dim=3):
        super().__init__()
        self.times = times
        self.w = torch.randn(dim, dim) * 0.5
        self.theta = torch.nn.Parameter(torch.zeros(len(times) - 1, dim))
        self.base_calls = 0
        self.ft_calls = 0

    def index(self, t):
        return int(torch.argmin((self.times - t).abs()))

    def base_velocity(self, x, t):
        self.base_calls += 1
        return -x + torch.tanh(x @ self.w)

    def velocity(self, x, t):
        self.ft_calls += 1
        return -x + torch.tanh(x @ self.w) + self.theta[self.index(t)]


def linear_reward(x):
    return x @ torch.tensor([1.0, -0.5, 2.0])


def make(seed=0):
    torch.manual_seed(seed)
    times = torch.linspace(0, 1, N + 1)
    return StepwiseFlow(times), times, torch.randn(4, 3)


def grad_rows(flow):
    return [int(i) for i in torch.nonzero(flow.theta.grad.abs().sum(1) > 0).flatten()]


@pytest.mark.parametrize("k", [1, 3, N])
def test_ode_am_reaches_only_last_k_steps_and_costs_linear_in_k(k):
    flow, times, noise = make()
    with torch.no_grad():
        flow.theta.add_(0.1 * torch.randn_like(flow.theta))
    out = ode_am_step(flow, noise, times, linear_reward, truncate_steps=k, order=2.0)
    assert grad_rows(flow) == list(range(N - k, N))
    assert flow.ft_calls == N + k  # N sampling forwards + K loss forwards
    assert flow.base_calls == k  # K VJPs, their forward reused by the loss
    assert out.control_norm_per_step.shape == (k,)
    assert out.reward.shape == (4,) and out.final_states.shape == (4, 3)


@pytest.mark.parametrize("order", [2.0, 4.0, 1.5])
def test_ode_am_loss_regresses_onto_phi_p_of_lean_adjoint(order):
    flow, times, noise = make(1)
    with torch.no_grad():
        flow.theta.add_(0.2 * torch.randn_like(flow.theta))
    k, lam = 3, 2.5
    out = ode_am_step(flow, noise, times, linear_reward, truncate_steps=k, order=order, reward_scale=lam)
    # Recompute by hand.
    x = noise
    states = [x]
    for i in range(N):
        x = x + (times[i + 1] - times[i]) * flow.velocity(x, times[i]).detach()
        states.append(x)
    window = torch.stack(states[N - k:])
    terminal = -lam * torch.tensor([1.0, -0.5, 2.0]).expand(4, 3)
    adj = lean_adjoint(flow.base_velocity, window, times[N - k:], terminal)
    expected = 0.0
    for j in range(k):
        t = times[N - k + j]
        u = flow.velocity(window[j], t) - flow.base_velocity(window[j], t)
        expected += float(matching_loss(u.detach(), optimal_control(adj[j], order))) / k
    assert abs(out.loss - expected) < 1e-4 * max(1.0, abs(expected))
    torch.testing.assert_close(out.final_states, states[-1].detach())


def test_ode_am_gradient_is_zero_at_the_optimum():
    # When u_theta already equals phi_2(a~) (here: a linear reward on a linear base), the
    # matching loss has a zero gradient.
    times = torch.linspace(0, 1, N + 1)

    class Linear(PlainBaseVJP, torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(N, 3))

        def base_velocity(self, x, t):
            return -0.5 * x

        def velocity(self, x, t):
            return -0.5 * x + self.theta[int(torch.argmin((times - t).abs()))]

    flow = Linear()
    c = torch.tensor([1.0, -0.5, 2.0])
    # a~_N = -c, a~_k = (1 - 0.5 dt) a~_{k+1}  =>  target phi_2 = -a~_k
    a = -c
    targets = [None] * N
    for k in range(N - 1, -1, -1):
        a = a + (times[k + 1] - times[k]) * (-0.5) * a
        targets[k] = -a
    with torch.no_grad():
        flow.theta.copy_(torch.stack(targets))
    out = ode_am_step(flow, torch.randn(5, 3), times, linear_reward, truncate_steps=N)
    assert out.loss < 1e-10
    assert flow.theta.grad.abs().max() < 1e-6


@pytest.mark.parametrize("k", [1, 2, N])
def test_draft_gradient_reaches_only_last_k_steps(k):
    flow, times, noise = make()
    out = draft_step(flow, noise, times, linear_reward, truncate_steps=k)
    assert grad_rows(flow) == list(range(N - k, N))
    torch.testing.assert_close(out.reward, linear_reward(out.final_states))
    assert out.loss == pytest.approx(-float(out.reward.mean()), rel=1e-5)
    assert out.control_norm_per_step.shape == (k,)


def test_refl_draws_one_step_among_last_k():
    k = 3
    seen = set()
    for seed in range(30):
        flow, times, noise = make(seed % 3)
        out = refl_step(flow, noise, times, linear_reward, truncate_steps=k, generator=torch.Generator().manual_seed(seed))
        assert N - k <= out.step_index < N
        assert grad_rows(flow) == [out.step_index]  # one step only
        seen.add(out.step_index)
    assert seen == set(range(N - k, N))


def test_refl_one_step_prediction():
    flow, times, noise = make()
    out = refl_step(flow, noise, times, linear_reward, truncate_steps=1)
    j = out.step_index
    assert j == N - 1
    x = noise
    for i in range(j):
        x = x + (times[i + 1] - times[i]) * flow.velocity(x, times[i]).detach()
    x1 = x + (1 - times[j]) * flow.velocity(x, times[j]).detach()
    torch.testing.assert_close(out.final_states, x1)


def test_sde_am_memoryless_matches_quadratic_target_and_truncation():
    flow, times, noise = make()
    k = 2
    out = sde_am_step(flow, noise, times, linear_reward, truncate_steps=k, generator=torch.Generator().manual_seed(0))
    assert grad_rows(flow) == list(range(N - k, N))
    assert flow.base_calls == k  # one base VJP per trained step, its forward reused by the loss
    assert torch.isfinite(torch.tensor(out.loss))
    # theta = 0: the control is zero, so the loss is E |sigma a~|^2 and the reported norms are 0.
    assert out.control_norm_per_step.abs().max() < 1e-6
    # the value, written out: Euler-Maruyama with the memoryless drift 2 v - x / t and sigma^2 = 2 (1 - t) / t
    # (t clipped to [0.01, 1]), the lean adjoint by autograd through that drift over the last k steps
    out = sde_am_step(flow, noise, times, linear_reward, truncate_steps=k, refine=False,
                      generator=torch.Generator().manual_seed(0))
    gen, x, states = torch.Generator().manual_seed(0), noise, [noise]

    def drift(x, t):
        return 2 * flow.base_velocity(x, t) - x / t.clamp(0.01, 1.0)

    def sigma(t):
        t = t.clamp(0.01, 1.0)
        return (2 * (1 - t) / t).sqrt()

    for i in range(N):
        dt = times[i + 1] - times[i]
        x = x + dt * drift(x, times[i]) + sigma(times[i]) * dt.sqrt() * torch.randn(x.shape, generator=gen)
        states.append(x)
    a = -torch.tensor([1.0, -0.5, 2.0]).expand(4, 3)  # -lambda grad r, lambda = 1
    expected = 0.0
    for i in range(N - 1, N - k - 1, -1):
        xi = states[i].detach().requires_grad_(True)
        (jt_a,) = torch.autograd.grad(drift(xi, times[i]), xi, grad_outputs=a)
        a = a + (times[i + 1] - times[i]) * jt_a
        expected += float((sigma(times[i]) * a).pow(2).sum(1).mean()) / k
    torch.testing.assert_close(out.final_states, states[-1])
    assert out.loss == pytest.approx(expected, rel=1e-5)


def test_sde_am_is_reproducible_with_a_generator_and_noisy_without():
    flow, times, noise = make()
    a = sde_am_step(flow, noise, times, linear_reward, truncate_steps=1, generator=torch.Generator().manual_seed(3))
    b = sde_am_step(flow, noise, times, linear_reward, truncate_steps=1, generator=torch.Generator().manual_seed(3))
    c = sde_am_step(flow, noise, times, linear_reward, truncate_steps=1, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a.final_states, b.final_states)
    assert not torch.allclose(a.final_states, c.final_states)


def test_schedules():
    t = torch.tensor(0.25)
    mem = MemorylessSchedule()
    torch.testing.assert_close(mem.sigma(t) ** 2, torch.tensor(2 * 0.75 / 0.25))
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    torch.testing.assert_close(mem.drift(x, v, t), 2 * v - x / 0.25)
    # The general formula agrees with the closed form of the memoryless schedule.
    from diffusers_am.schedules import NoiseSchedule

    general = NoiseSchedule.drift(mem, x, v, t)
    torch.testing.assert_close(general, 2 * v - x / 0.25)
    # t is clipped near 0: no inf.
    assert torch.isfinite(mem.drift(x, v, torch.tensor(0.0))).all()
    const = ConstantSchedule(level=0.7)
    torch.testing.assert_close(const.sigma(t), torch.tensor(0.7))
    # SiT's diffusion coefficients (sigma^2 = 2 w_t): w_t = 1 - t and w_t = sin^2(pi t); their closed-form drifts
    # against the general formula b = v + sigma^2 / 2 * score, score = -(x - t v) / (1 - t), written out here.
    for sched, w in ((LinearSchedule(), 0.75), (SineSchedule(), math.sin(math.pi * 0.25) ** 2)):
        torch.testing.assert_close(sched.sigma(t) ** 2, torch.tensor(2 * w))
        torch.testing.assert_close(sched.drift(x, v, t), v + w * -(x - 0.25 * v) / 0.75)
    # sin^2(pi t) / (1 - t) -> 0 at t = 1: the sine drift is the velocity there, not NaN.
    torch.testing.assert_close(SineSchedule().drift(x, v, torch.tensor(1.0)), v)
    torch.testing.assert_close(LinearSchedule().drift(x, v, torch.tensor(1.0)), 2 * v - x)
    assert isinstance(get_schedule("memoryless", scale=0.5), MemorylessSchedule)
    assert isinstance(get_schedule("linear"), LinearSchedule) and isinstance(get_schedule("sine"), SineSchedule)
    from diffusers_am.schedules import SCHEDULES
    from diffusers_am.training.config import parse_args

    for name in SCHEDULES:  # the CLI accepts every schedule the library has
        assert parse_args(["--method", "sde-am", "--sde_schedule", name]).sde_schedule == name
    with pytest.raises(ValueError, match="sde_schedule"):
        parse_args(["--method", "sde-am", "--sde_schedule", "cosine"])
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_schedule("cosine")
    with pytest.raises(ValueError, match="t_min"):
        MemorylessSchedule(t_min=0.0)


@pytest.mark.parametrize("schedule", [MemorylessSchedule(), MemorylessSchedule(scale=0.5), ConstantSchedule(level=0.7),
                                      LinearSchedule(), SineSchedule()])
def test_drift_vjp_is_autograd_through_the_drift_of_one_velocity_vjp(schedule):
    flow, _, _ = make()
    assert isinstance(flow, ConditionedFlow)
    x, a, t = torch.randn(4, 3), torch.randn(4, 3), torch.tensor(0.3)
    value, jt = schedule.drift_vjp(flow.base_vjp, x, t, a)
    assert flow.base_calls == 1
    x_in = x.clone().requires_grad_(True)
    drift = schedule.drift(x_in, flow.base_velocity(x_in, t), t)
    (expected,) = torch.autograd.grad(drift, x_in, grad_outputs=a)
    torch.testing.assert_close(value, drift.detach())
    torch.testing.assert_close(jt, expected)


@pytest.mark.parametrize("step", [ode_am_step, sde_am_step, draft_step, refl_step])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_reward_stops_before_backward(step, bad):
    flow, times, noise = make()

    def reward(x):
        r = linear_reward(x)
        return r * torch.tensor([1.0, 1.0, bad, 1.0])

    calls = []
    with pytest.raises(NonFiniteRewardError):
        step(flow, noise, times, reward, truncate_steps=2, backward=calls.append)
    assert calls == [] and flow.theta.grad is None


@pytest.mark.parametrize("step", [ode_am_step, sde_am_step, draft_step, refl_step])
@pytest.mark.parametrize("k", [0, N + 1, -1, 2.5])
def test_bad_truncation_is_rejected(step, k):
    flow, times, noise = make()
    with pytest.raises(ValueError, match="truncate_steps"):
        step(flow, noise, times, linear_reward, truncate_steps=k)


def test_bad_grid_and_reward_shape():
    flow, times, noise = make()
    with pytest.raises(ValueError, match="strictly increasing"):
        ode_am_step(flow, noise, times.flip(0), linear_reward, truncate_steps=1)
    with pytest.raises(ValueError, match="one value per sample"):
        ode_am_step(flow, noise, times, lambda x: x.sum(), truncate_steps=1)
    with pytest.raises(ValueError, match="order"):
        ode_am_step(flow, noise, times, linear_reward, truncate_steps=1, order=1.0)
    with pytest.raises(ValueError, match="loss_reduction"):
        ode_am_step(flow, noise, times, linear_reward, truncate_steps=1, loss_reduction="median")


def test_sde_grid_refinement_keeps_points_and_makes_steps_stable():
    from diffusers_am.schedules import refine_grid

    sched = MemorylessSchedule()
    times = torch.linspace(0, 1, 11)
    fine = refine_grid(times, sched)
    assert all(bool((fine == t).any()) for t in times)
    assert (fine[1:] > fine[:-1]).all()
    dt = fine[1:] - fine[:-1]
    coeff = torch.stack([sched.state_coeff(t.clamp_min(sched.t_min)) for t in fine[:-1]])
    assert float((dt * coeff).max()) <= 0.5 + 1e-5
    assert len(fine) - len(times) < 12  # a few points near t = 0 only
    # A grid already fine enough is returned as is.
    late = torch.linspace(0.5, 1, 6)
    torch.testing.assert_close(refine_grid(late, sched), late)
    with pytest.raises(ValueError, match="max_step"):
        refine_grid(times, sched, max_step=1.5)


@pytest.mark.parametrize("name", ["memoryless", "linear", "sine"])
def test_sde_am_sampling_keeps_base_marginal_from_t0(name):
    # 1-D Gaussian data N(1, 0.5^2): with a zero control the SDE from t = 0 must end in the data law, whatever
    # the schedule (each has the base's marginals). On a grid coarse near t = 0 (here t_1 = 0.22) plain
    # Euler-Maruyama with the memoryless schedule ends with std ~1.0 instead of 0.5; the refined grid fixes it.
    m, s = 1.0, 0.5

    class Gaussian(PlainBaseVJP, torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.theta = torch.nn.Parameter(torch.zeros(1))

        def base_velocity(self, x, t):
            d = (1 - t) ** 2 + t**2 * s**2
            alpha = (t * s**2 - (1 - t)) / d
            return alpha * x + m - alpha * t * m

        def velocity(self, x, t):
            return self.base_velocity(x, t) + self.theta

    flow = Gaussian()
    noise = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0))
    coarse_early = torch.linspace(0, 1, 21) ** 0.5
    out = sde_am_step(flow, noise, coarse_early, lambda x: x[:, 0], truncate_steps=1, schedule=get_schedule(name),
                      generator=torch.Generator().manual_seed(1))
    x1 = out.final_states[:, 0]
    assert abs(float(x1.mean()) - m) < 0.05
    assert abs(float(x1.std()) - s) < 0.05
    full = sde_am_step(flow, noise[:64], torch.linspace(0, 1, 21), lambda x: x[:, 0], truncate_steps=20,
                       generator=torch.Generator().manual_seed(1))
    assert full.control_norm_per_step.shape[0] > 20  # K = N covers the refined grid
