"""The lean adjoint is the exact adjoint of the Euler sampler (control Jacobian dropped)."""

from functools import partial

import pytest
import torch

from diffusers_am.adjoint import lean_adjoint, lean_adjoint_window, vjp_velocity


class MLPVelocity(torch.nn.Module):
    def __init__(self, dim=3, hidden=16, dtype=torch.float64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim + 1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim)
        ).to(dtype)
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        tt = t.to(x.dtype).expand(x.shape[0], 1)
        return self.net(torch.cat([x, tt], dim=1))


def time_only_control(t):
    # A control independent of x: its Jacobian is zero, so the lean adjoint is exact.
    return 0.3 * torch.sin(6 * t)


def unrolled(base, x0, times):
    xs = [x0]
    for k in range(len(times) - 1):
        x = xs[-1]
        xs.append(x + (times[k + 1] - times[k]) * (base(x, times[k]) + time_only_control(times[k])))
    return xs


def reward(x):
    return (x.sin() * torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype)).sum(1) + (x**2).sum(1)


@pytest.mark.parametrize("num_steps,k", [(6, 6), (6, 3), (6, 1), (9, 4)])
def test_lean_adjoint_equals_autograd_through_unrolled_euler(num_steps, k):
    torch.manual_seed(1)
    base = MLPVelocity()
    times = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64) ** 1.3  # non-uniform grid
    x0 = torch.randn(4, 3, dtype=torch.float64)
    xs = unrolled(base, x0, times)
    # Rebuild the last K steps from the detached window start so autograd sees them alone.
    chain = [xs[num_steps - k].detach().requires_grad_(True)]
    for j in range(k):
        i = num_steps - k + j
        x = chain[-1]
        chain.append(x + (times[i + 1] - times[i]) * (base(x, times[i]) + time_only_control(times[i])))
    lam = 1.7
    g = -lam * reward(chain[-1]).sum()
    expected = torch.autograd.grad(g, chain)
    x_n = chain[-1].detach().requires_grad_(True)
    (terminal,) = torch.autograd.grad(-lam * reward(x_n).sum(), x_n)
    states = torch.stack([c.detach() for c in chain])
    base.calls = 0
    got = lean_adjoint(base, states, times[num_steps - k:], terminal)
    assert got.shape == (k + 1, 4, 3) and got.dtype == torch.float64
    assert base.calls == k  # one VJP per trained step
    for j in range(k + 1):
        torch.testing.assert_close(got[j], expected[j], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[-1], terminal)


def test_low_precision_model_gives_fp32_adjoint_and_base_velocities():
    base = MLPVelocity(dtype=torch.bfloat16)

    def velocity(x, t):
        return base(x.to(torch.bfloat16), t)

    states = torch.randn(3, 2, 3)
    terminal = torch.randn(2, 3, dtype=torch.bfloat16)
    out = lean_adjoint_window(partial(vjp_velocity, velocity), states, torch.tensor([0.5, 0.75, 1.0]), terminal)
    assert out.adjoints.dtype == torch.float32
    assert out.base_velocities.shape == (2, 2, 3)
    torch.testing.assert_close(out.base_velocities[0].float(), velocity(states[0], torch.tensor(0.5)).float())


@pytest.mark.parametrize(
    "states_shape,times,grad_shape,match",
    [
        ((3,), [0.0, 0.5, 1.0], (3,), "states"),
        ((1, 2, 3), [1.0], (2, 3), "K\\+1 >= 2"),
        ((3, 2, 3), [0.0, 1.0], (2, 3), "times"),
        ((3, 2, 3), [0.0, 0.5, 0.5], (2, 3), "strictly increasing"),
        ((3, 2, 3), [0.0, 0.8, 0.6], (2, 3), "strictly increasing"),
        ((3, 2, 3), [-0.1, 0.5, 1.0], (2, 3), "\\[0, 1\\]"),
        ((3, 2, 3), [0.0, 0.5, 1.2], (2, 3), "\\[0, 1\\]"),
        ((3, 2, 3), [0.0, 0.5, 1.0], (2, 4), "terminal_grad"),
        ((3, 2, 3), [0.0, 0.5, 1.0], (3, 3), "terminal_grad"),
    ],
)
def test_bad_window_is_rejected(states_shape, times, grad_shape, match):
    with pytest.raises(ValueError, match=match):
        lean_adjoint(MLPVelocity(dtype=torch.float32), torch.zeros(states_shape), torch.tensor(times), torch.zeros(grad_shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_terminal_grad_is_rejected(bad):
    grad = torch.zeros(2, 3)
    grad[1, 2] = bad
    with pytest.raises(ValueError, match="terminal_grad.*NaN or inf"):
        lean_adjoint(MLPVelocity(dtype=torch.float32), torch.zeros(3, 2, 3), torch.tensor([0.0, 0.5, 1.0]), grad)
