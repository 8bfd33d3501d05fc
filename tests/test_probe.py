"""The full-trajectory control probe against the Gaussian toy's closed forms, and on a tiny SiT with LoRA."""

import math

import numpy as np
import pytest
import torch
from _tiny_sit import tiny_pixel_pipeline

from diffusers_am.models import LoraSettings
from diffusers_am.models.sit import SiTAdapter
from diffusers_am.objectives import NonFiniteRewardError
from diffusers_am.probe import ControlProfile, probe_control_profile
from diffusers_am.schedules import MemorylessSchedule
from diffusers_am.toy.gaussian import ClosedFormControl, GaussianToy, ToyControlledFlow
from diffusers_am.toy.gaussian_fit import uniform_grid

DIMS = 3  # every coordinate is an independent copy of the 1-D toy: per-sample norms carry sqrt(DIMS)


def _toy_probe(toy, times, *, control=None, schedule=None, batch=6, **kwargs):
    flow = ToyControlledFlow(toy, control if control is not None else ZeroControl())  # default: the base flow
    noise = torch.randn(batch, DIMS, dtype=times.dtype, generator=torch.Generator().manual_seed(1))
    return probe_control_profile(
        flow, noise, times, toy.reward, schedule=schedule, generator=torch.Generator().manual_seed(2), **kwargs
    )


class ZeroControl(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def test_ode_probe_is_the_exact_euler_adjoint_of_the_toy():
    toy = GaussianToy(mean=1.0, std=0.5, reward_slope=-1.5)
    times = uniform_grid(20).double()
    prof = _toy_probe(toy, times, reward_scale=2.0)
    assert prof.method == "ode-am" and prof.num_steps == 20 and prof.adjoint_norms.shape == (20, 6)
    assert torch.equal(prof.step_index, torch.arange(20)) and torch.equal(prof.times, times)
    exact = (2.0 / toy.reward_scale) * toy.euler_lean_adjoint(times)[:-1].abs() * math.sqrt(DIMS)
    torch.testing.assert_close(prof.adjoint_norms, exact[:, None].expand(20, 6), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(prof.intensity_per_step(), exact)  # p = 2: |u*| = |a~|
    assert float(prof.current_control().abs().max()) < 1e-12  # the base flow has no control yet
    torch.testing.assert_close(prof.residual(), prof.control_norms())  # ... so all of u* is left to fit
    # energy: dt |u*|^2; its share sums to 1 and peaks at the step holding t* = 1 / (1 + s^2) = 0.8
    torch.testing.assert_close(prof.energy_per_step(), exact.pow(2) * (times[1:] - times[:-1]))
    assert float(prof.energy_share().sum()) == pytest.approx(1.0)
    assert float(prof.step_times()[prof.intensity_per_step().argmax()]) == pytest.approx(0.8, abs=0.05)


@pytest.mark.parametrize("order", [2.0, 4.0, 6.0])
def test_ode_probe_reads_the_learned_control_off_the_trajectory(order):
    toy = GaussianToy(mean=1.0, std=0.6)
    times = uniform_grid(10).double()
    prof = _toy_probe(toy, times, control=ClosedFormControl(toy, order), order=order)
    expected = toy.optimal_control(times[:-1], order).abs() * math.sqrt(DIMS)  # |u*(t_k)| on every coordinate
    torch.testing.assert_close(prof.current_control(), expected, rtol=1e-9, atol=1e-12)
    # the adjoint does not see the control (lean: base Jacobians only), so it is still the exact Euler adjoint
    exact = toy.euler_lean_adjoint(times)[:-1].abs() * math.sqrt(DIMS)
    torch.testing.assert_close(prof.adjoint_norms.mean(1), exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(prof.control_norms(), prof.adjoint_norms.pow(1 / (order - 1)))


@pytest.mark.parametrize("order", [2.0, 4.0])
def test_residual_is_what_the_learned_control_still_misses(order):
    # 1-D toy (phi_p of the one coordinate is u*(t)'s Euler analogue): a flow whose control is u*(t) leaves
    # |u*(t_k) - phi_p(a~_k)| per step, the Euler discretisation of the target; rescaling lambda or p is exact
    toy = GaussianToy(mean=1.0, std=0.6, reward_slope=0.5, reward_scale=2.0)
    times = uniform_grid(10).double()
    flow = ToyControlledFlow(toy, ClosedFormControl(toy, order))
    noise = torch.randn(4, 1, dtype=torch.float64)
    prof = probe_control_profile(flow, noise, times, toy.reward, order=order, reward_scale=2.0)
    a_k = toy.euler_lean_adjoint(times)[:-1]
    target = -a_k.sign() * a_k.abs().pow(1 / (order - 1))
    gap = (toy.optimal_control(times[:-1], order) - target).abs()
    torch.testing.assert_close(prof.residual(), gap[:, None].expand(10, 4), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(prof.residual_per_step(), gap.pow(2) * prof.dt)
    for lam, p in ((5.0, order), (2.0, 6.0)):
        again = probe_control_profile(flow, noise, times, toy.reward, order=p, reward_scale=lam)
        torch.testing.assert_close(prof.at(lam).with_order(p).residual(), again.residual(), rtol=1e-6, atol=1e-9)


def test_profiles_rescale_exactly_in_lambda_and_order():
    toy = GaussianToy(mean=0.3, std=0.7)
    times = uniform_grid(12).double()
    at_one = _toy_probe(toy, times, reward_scale=1.0)
    at_three = _toy_probe(toy, times, reward_scale=3.0)
    torch.testing.assert_close(at_one.at(3.0).adjoint_norms, at_three.adjoint_norms)
    p4 = at_one.with_order(4)
    assert p4.order == 4.0 and p4.scale_exponent == pytest.approx(1 / 3)
    torch.testing.assert_close(p4.at(8.0).control_norms(), 2.0 * p4.control_norms())  # |u*| ~ lambda^(1/3)
    torch.testing.assert_close(p4.energy(), p4.dt[:, None] * p4.adjoint_norms.pow(4 / 3))
    # the energy share does not depend on lambda
    torch.testing.assert_close(p4.at(50.0).energy_share(), p4.energy_share())
    for bad in (0.0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="reward_scale"):
            at_one.at(bad)
    with pytest.raises(ValueError, match="order"):
        at_one.with_order(1.0)


def test_sde_probe_is_the_exact_adjoint_of_the_memoryless_drift_on_the_refined_grid():
    toy = GaussianToy(mean=1.0, std=0.5, reward_slope=0.7)
    schedule = MemorylessSchedule()
    times = uniform_grid(20).double()
    prof = _toy_probe(toy, times, schedule=schedule, reward_scale=1.5)
    assert prof.method == "sde-am" and prof.order == 2.0 and prof.scale_exponent == 1.0
    m = prof.times.shape[0] - 1
    assert m > 20 and prof.adjoint_norms.shape == (m, 6)  # refined near t = 0
    # every sampling step is covered, in order, and starts at its own time
    assert torch.equal(torch.unique(prof.step_index), torch.arange(20))
    assert bool((prof.step_index[1:] >= prof.step_index[:-1]).all())
    torch.testing.assert_close(prof.step_times(), times[:-1])
    # exact discrete adjoint of Euler-Maruyama with drift gain(t) b - coeff(t) x (independent of the noise)
    t, dt = prof.times[:-1], prof.times[1:] - prof.times[:-1]
    gain = torch.stack([schedule.velocity_gain(tk) for tk in t])
    coeff = torch.stack([schedule.state_coeff(tk) for tk in t])
    factors = 1 + dt * (gain * toy.alpha(t) - coeff)
    exact = 1.5 * 0.7 * torch.flip(torch.cumprod(torch.flip(factors, [0]), 0), [0]) * math.sqrt(DIMS)
    torch.testing.assert_close(prof.adjoint_norms, exact[:, None].expand(m, 6), rtol=1e-9, atol=1e-12)
    # the schedule's view: u* = -sigma a~, velocity change sigma^2 |a~| / 2 = (1 - t) / t |a~|
    torch.testing.assert_close(prof.control_norms(), prof.sigma[:, None] * prof.adjoint_norms)
    late = t > 0.05
    torch.testing.assert_close(
        prof.velocity_change()[late], ((1 - t[late]) / t[late])[:, None] * prof.adjoint_norms[late]
    )
    # the refined sub-steps of step 0 all add into energy_per_step[0]
    torch.testing.assert_close(prof.energy_per_step().sum(), prof.energy().mean(1).sum())
    assert prof.current_control() is None and prof.residual() is None and prof.residual_per_step() is None


def test_sde_probe_converges_to_the_continuous_closed_form_at_first_order():
    toy = GaussianToy(mean=1.0, std=0.5)
    errors = []
    for n in (200, 400):
        prof = _toy_probe(toy, uniform_grid(n).double(), schedule=MemorylessSchedule(), batch=2)
        t = prof.step_times()
        keep = t >= 0.25
        closed = toy.sde_lean_adjoint(t[keep]).abs() * math.sqrt(DIMS)
        measured = prof.adjoint_norms[prof.first_steps()][keep, 0]
        errors.append(float(((measured - closed) / closed).abs().max()))
    assert errors[1] < 2.5e-2
    assert errors[0] / errors[1] == pytest.approx(2.0, rel=0.1)  # Euler-Maruyama's adjoint: O(dt)


def test_probe_log_record_is_plain_numbers():
    toy = GaussianToy()
    prof = _toy_probe(toy, uniform_grid(5).double(), reward_scale=2.0, order=4.0)
    log = prof.to_log()
    assert set(log) == {
        "probe_times", "probe_intensity", "probe_energy_share", "probe_reward_scale", "probe_order",
        "probe_current_control", "probe_residual_share", "probe_reward_mean",
    }
    assert len(log["probe_intensity"]) == 5 and all(isinstance(v, float) for v in log["probe_energy_share"])
    assert log["probe_reward_scale"] == 2.0 and log["probe_order"] == 4.0


def test_probe_rejects_bad_input():
    toy = GaussianToy()
    flow = ToyControlledFlow(toy, ZeroControl())
    noise = torch.randn(3, 1)
    with pytest.raises(ValueError, match="reward_scale"):
        probe_control_profile(flow, noise, uniform_grid(4), toy.reward, reward_scale=0.0)
    with pytest.raises(ValueError, match="order"):
        probe_control_profile(flow, noise, uniform_grid(4), toy.reward, order=1.0)
    with pytest.raises(ValueError, match="times"):
        probe_control_profile(flow, noise, torch.tensor([0.0, 0.6, 0.5, 1.0]), toy.reward)
    with pytest.raises(NonFiniteRewardError):
        probe_control_profile(flow, noise, uniform_grid(4), lambda x: x.sum((1,)) * float("nan"))


def test_probe_on_a_tiny_sit_with_lora_matches_the_adjoint_by_hand():
    adapter = SiTAdapter(tiny_pixel_pipeline())
    params = adapter.add_lora(LoraSettings(rank=2))
    flow = adapter.flow(adapter.encode_conditions([0, 3, 7]))
    noise = adapter.initial_noise(3, adapter.default_resolution, torch.Generator().manual_seed(0))
    times = adapter.time_grid(5, adapter.default_resolution)

    def reward_fn(x):
        return adapter.decode(x).pow(2).mean(dim=(1, 2, 3))

    prof = probe_control_profile(flow, noise, times, reward_fn, reward_scale=4.0)
    assert prof.adjoint_norms.shape == (5, 3) and torch.isfinite(prof.adjoint_norms).all()
    assert float(prof.current_control().abs().max()) < 1e-5  # LoRA B starts at zero: v_theta = b
    assert all(p.grad is None for p in params)  # the probe trains nothing
    # by hand: Euler with the base, then a~_k = a~_{k+1} + dt J_b^T a~_{k+1} with autograd
    states = [noise]
    with torch.no_grad():
        for k in range(5):
            states.append(states[-1] + (times[k + 1] - times[k]) * flow.base_velocity(states[-1], times[k]))
    x1 = states[-1].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reward_fn(x1).sum(), x1)
    a, norms = -4.0 * grad, []
    for k in range(4, -1, -1):
        x = states[k].clone().requires_grad_(True)
        with adapter.adapters_disabled():
            v = flow.base_velocity(x, times[k])
        (jt_a,) = torch.autograd.grad(v, x, grad_outputs=a)
        a = a + (times[k + 1] - times[k]) * jt_a
        norms.append(a.flatten(1).norm(dim=1))
    torch.testing.assert_close(prof.adjoint_norms, torch.stack(norms[::-1]), rtol=1e-4, atol=1e-6)
    assert isinstance(prof, ControlProfile) and prof.reward.shape == (3,)
    assert np.isfinite(prof.to_log()["probe_reward_mean"])
