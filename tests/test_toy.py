"""The Gaussian toy: closed forms against the library's numerics (lean_adjoint, phi_p, Euler, ODE-AM)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _scripts import load_script

from diffusers_am.adjoint import lean_adjoint
from diffusers_am.control import optimal_control
from diffusers_am.flow import ConditionedFlow, sample_euler
from diffusers_am.objectives import ode_am_step
from diffusers_am.toy.gaussian import ClosedFormControl, GaussianToy, MLPControl, ToyControlledFlow
from diffusers_am.toy.gaussian_fit import control_error, simulated_mean_shift, train_toy_control, uniform_grid

REPO = Path(__file__).resolve().parents[1]


def _base_adjoint(toy, times, batch=4):
    states = sample_euler(toy.base_velocity, torch.randn(batch, 1, dtype=times.dtype), times, record_last=len(times))
    terminal = torch.full_like(states[-1], toy.terminal_adjoint)
    return lean_adjoint(toy.base_velocity, states, times, terminal)[:, :, 0]  # [N+1, B]


@pytest.mark.parametrize("std", [0.5, 0.8, 1.3])
def test_base_flow_transports_the_gaussian_marginals(std):
    toy = GaussianToy(mean=0.7, std=std)
    t = torch.linspace(0.01, 0.99, 25, dtype=torch.float64).requires_grad_(True)
    d = toy.variance(t)
    (d_prime,) = torch.autograd.grad(d.sum(), t)
    with torch.no_grad():
        # X_t ~ N(t m, D): the mean moves at alpha * t m + beta = m, the variance at 2 alpha D = D'.
        torch.testing.assert_close(toy.alpha(t) * t * toy.mean + toy.beta(t), torch.full_like(t, toy.mean))
        torch.testing.assert_close(2 * toy.alpha(t) * d, d_prime)
    x1 = sample_euler(toy.base_velocity, torch.randn(20000, 1, dtype=torch.float64), uniform_grid(400).double())[-1]
    assert abs(float(x1.mean()) - toy.mean) < 0.03
    assert abs(float(x1.std()) - std) < 0.03


def test_lean_adjoint_on_the_toy_matches_discrete_and_continuous_closed_forms():
    toy = GaussianToy(mean=1.0, std=0.5, reward_slope=-1.5, reward_scale=2.0)
    times = uniform_grid(200).double()
    adj = _base_adjoint(toy, times)
    # independent of x, equal to the exact Euler adjoint, and O(dt) from the continuous one
    torch.testing.assert_close(adj, adj[:, :1].expand_as(adj))
    torch.testing.assert_close(adj[:, 0], toy.euler_lean_adjoint(times), rtol=1e-10, atol=1e-12)
    continuous = toy.lean_adjoint(times)
    assert float(((adj[:, 0] - continuous) / continuous).abs().max()) < 1e-2
    assert float(((adj[:, 0] - continuous) / continuous).abs().max()) > 1e-5  # Euler, not exact
    torch.testing.assert_close(toy.lean_adjoint(1.0), torch.tensor(toy.terminal_adjoint, dtype=torch.float64))


@pytest.mark.parametrize("std", [0.5, 0.6, 0.9])
def test_peak_time_of_the_lean_adjoint_is_t_star(std):
    toy = GaussianToy(std=std)
    assert toy.peak_time == pytest.approx(1 / (1 + std**2))
    assert float(toy.alpha(toy.peak_time)) == pytest.approx(0.0, abs=1e-12)
    times = uniform_grid(1000).double()
    adj = _base_adjoint(toy, times, batch=2)
    peak = float(times[int(adj[:, 0].abs().argmax())])
    assert abs(peak - toy.peak_time) <= 1e-3 + 1e-12  # within one grid step
    assert abs(peak - toy.peak_time) / toy.peak_time < 0.01


@pytest.mark.parametrize("order", [1.5, 2.0, 4.0, 6.0])
def test_normalized_profile_from_lean_adjoint_matches_closed_form(order):
    toy = GaussianToy(std=0.6)
    times = uniform_grid(1000).double()
    adj = _base_adjoint(toy, times, batch=2)
    u = optimal_control(adj.reshape(-1, 1), order).reshape(adj.shape).abs()[:, 0]
    closed = toy.normalized_profile(times, order)
    assert float((u / u.max() - closed).abs().max()) < 2e-3
    assert float(toy.normalized_profile(toy.peak_time, order)) == pytest.approx(1.0)


def test_higher_order_profiles_are_flatter_with_the_same_peak():
    toy = GaussianToy(std=0.5)
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    profiles = [toy.normalized_profile(t, p) for p in (2, 4, 6)]
    assert all(int(pr.argmax()) == 160 for pr in profiles)  # t = 0.8 = t*
    assert bool((profiles[0] <= profiles[1] + 1e-15).all() and (profiles[1] <= profiles[2] + 1e-15).all())
    assert float(profiles[0].min()) < float(profiles[2].min())


def test_optimal_control_closed_form_and_signs():
    toy = GaussianToy(std=0.5, reward_slope=2.0, reward_scale=0.5)  # lambda c = 1
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    d = toy.variance(t)
    torch.testing.assert_close(toy.optimal_control(t, 2), 0.5 / d.sqrt())
    torch.testing.assert_close(toy.optimal_control(t, 4), (0.5 / d.sqrt()) ** (1 / 3))
    negative = GaussianToy(std=0.5, reward_slope=-2.0, reward_scale=0.5)  # the control pushes down
    torch.testing.assert_close(negative.optimal_control(t, 4), -((0.5 / d.sqrt()) ** (1 / 3)))


@pytest.mark.parametrize("std", [0.3, 0.5, 1.0, 2.0])
def test_quadratic_full_window_mean_shift_has_arctan_closed_form(std):
    # lambda c s^2 int_0^1 dt / D(t) = lambda c s pi / 2 (complete the square in D).
    toy = GaussianToy(std=std, reward_slope=1.5, reward_scale=0.4)
    assert toy.terminal_mean_shift(order=2) == pytest.approx(0.6 * std * math.pi / 2, rel=1e-10)


@pytest.mark.parametrize("order,window_start", [(2.0, 0.0), (4.0, 0.6), (1.5, 0.3)])
def test_terminal_mean_shift_matches_simulation(order, window_start):
    toy = GaussianToy(mean=0.3, std=0.5)
    flow = ToyControlledFlow(toy, ClosedFormControl(toy, order), control_start=window_start)
    shift = simulated_mean_shift(flow, num_steps=1000, batch_size=16, generator=torch.Generator().manual_seed(0))
    closed = toy.terminal_mean_shift(order=order, window_start=window_start)
    assert shift == pytest.approx(closed, rel=3e-3)
    # u(t) = 1 on [t_s, 1]: int s / sqrt(D) = s / sqrt(a) [ln(2 sqrt(a D(t)) + 2 a t - 2)], a = 1 + s^2
    a = 1 + toy.std**2
    antiderivative = lambda t: math.log(2 * math.sqrt(a * float(toy.variance(t))) + 2 * a * t - 2)  # noqa: E731
    ones = toy.std / math.sqrt(a) * (antiderivative(1.0) - antiderivative(window_start))
    assert toy.terminal_mean_shift(lambda t: torch.ones_like(t), window_start=window_start) == pytest.approx(ones)


def test_controlled_flow_is_a_conditioned_flow_with_a_zero_initial_control():
    toy = GaussianToy()
    flow = ToyControlledFlow(toy, MLPControl(hidden=8), control_start=0.5)
    assert isinstance(flow, ConditionedFlow)
    x = torch.randn(5, 1)
    t = torch.tensor(0.7)
    torch.testing.assert_close(flow.velocity(x, t), flow.base_velocity(x, t))
    torch.nn.init.normal_(flow.control.net[-1].weight)
    assert not torch.allclose(flow.velocity(x, t), flow.base_velocity(x, t))
    torch.testing.assert_close(flow.velocity(x, torch.tensor(0.4)), flow.base_velocity(x, torch.tensor(0.4)))
    assert flow.control(torch.randn(3, 2, 4), t).shape == (3, 2, 4)


def test_ode_am_step_trains_the_toy_control_unchanged():
    toy = GaussianToy()
    flow = ToyControlledFlow(toy, MLPControl(hidden=8))
    times = uniform_grid(10)
    out = ode_am_step(flow, torch.randn(6, 1), times, toy.reward, truncate_steps=4, order=4.0)
    assert out.control_norm_per_step.shape == (4,)
    assert float(out.control_norm_per_step.abs().max()) == 0.0  # zero-initialized control
    assert out.loss > 0
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("order,truncate_steps", [(2.0, 5), (4.0, 20)])
def test_short_ode_am_training_converges_to_the_closed_form_control(order, truncate_steps):
    toy = GaussianToy()
    flow, losses = train_toy_control(
        toy, order=order, num_steps=20, truncate_steps=truncate_steps, iterations=60, batch_size=16, seed=0
    )
    assert losses[-1] < 0.05 * losses[0]
    gen = torch.Generator().manual_seed(1)
    err = control_error(flow, uniform_grid(20), truncate_steps, order, batch_size=128, generator=gen)
    assert err.discrete < 0.05 and err.continuous < 0.08
    closed = toy.terminal_mean_shift(order=order, window_start=flow.control_start)
    shift = simulated_mean_shift(flow, num_steps=400, batch_size=128, generator=gen)
    assert shift == pytest.approx(closed, rel=0.08)


def test_invalid_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="std"):
        GaussianToy(std=0.0)
    with pytest.raises(ValueError, match="mean"):
        GaussianToy(mean=float("nan"))
    with pytest.raises(ValueError, match="reward_slope"):
        GaussianToy(reward_slope=0.0)
    toy = GaussianToy()
    with pytest.raises(ValueError, match="order"):
        toy.optimal_control(0.5, order=1.0)
    with pytest.raises(ValueError, match="window_start"):
        toy.terminal_mean_shift(window_start=1.0)
    with pytest.raises(ValueError, match="control"):
        toy.terminal_mean_shift(lambda t: torch.ones(3))
    with pytest.raises(ValueError, match="control_start"):
        ToyControlledFlow(toy, control_start=-0.1)
    with pytest.raises(ValueError, match="hidden"):
        MLPControl(hidden=0)
    with pytest.raises(ValueError, match="iterations"):
        train_toy_control(toy, iterations=0)
    with pytest.raises(ValueError, match="truncate_steps"):
        train_toy_control(toy, num_steps=10, truncate_steps=11)


def test_example_json_run(tmp_path):
    plot = tmp_path / "profiles.png"
    cmd = [
        sys.executable, str(REPO / "examples" / "gaussian_toy.py"), "--json", "--plot", str(plot),
        "--fine-steps", "400", "--num-steps", "20", "--truncate-steps", "5", "--train-orders", "4",
        "--iterations", "60", "--batch-size", "16",
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads(proc.stdout)
    assert result["passed"] and all(result["checks"].values())
    assert result["lean_adjoint"]["peak_time_closed_form"] == pytest.approx(0.8)
    assert set(result["lean_adjoint"]["profile_max_abs_error"]) == {"2", "4", "6"}
    (row,) = result["ode_am"]
    assert row["order"] == 4.0 and row["truncate_steps"] == 5 and row["control_rel_l2"] < 0.05
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an impossible tolerance makes the script fail with a non-zero status


def test_example_exits_non_zero_when_a_check_fails(capsys):
    example = load_script("examples/gaussian_toy.py", "gaussian_toy_example", register=False)
    threads = torch.get_num_threads()
    try:
        status = example.main(["--json", "--plot", "", "--fine-steps", "100", "--num-steps", "5", "--iterations", "2"])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out)
    assert status == 1 and not result["passed"] and result["checks"]["controls"] is False
    assert [r["truncate_steps"] for r in result["ode_am"]] == [5, 5]  # p = 2, 4; K = N = 5 once
