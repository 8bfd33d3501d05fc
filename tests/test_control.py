"""The regularizer of order p and its optimal control phi_p."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from diffusers_am.control import check_order, control_cost, optimal_control


@pytest.mark.parametrize("p", [1.3, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0])
def test_phi_p_minimizes_running_cost_plus_inner_product(p):
    gen = torch.Generator().manual_seed(int(p * 10))
    a = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    u_star = optimal_control(a, p)
    for i in range(a.shape[0]):
        ai = a[i].numpy()
        objective = lambda u: np.linalg.norm(u) ** p / p + ai @ u  # noqa: E731
        best = min(
            (minimize(objective, x0, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000})
             for x0 in (np.zeros(3), -ai, u_star[i].numpy() * 0.5)),
            key=lambda r: r.fun,
        )
        assert np.allclose(u_star[i].numpy(), best.x, atol=2e-4), (p, u_star[i], best.x)
        assert objective(u_star[i].numpy()) <= best.fun + 1e-9


@pytest.mark.parametrize("p", [1.5, 2.0, 4.0, 6.0])
def test_phi_p_norm_and_direction(p):
    a = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    u = optimal_control(a, p)
    assert u.shape == a.shape
    a_norm = a.flatten(1).norm(dim=1)
    torch.testing.assert_close(u.flatten(1).norm(dim=1), a_norm ** (1 / (p - 1)))
    cos = torch.nn.functional.cosine_similarity(u.flatten(1), -a.flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0, 6.0])
def test_phi_p_zero_adjoint_is_a_finite_zero(p):
    a = torch.zeros(3, 4)
    a[1] = torch.randn(4)
    u = optimal_control(a, p)
    assert torch.isfinite(u).all()
    assert torch.equal(u[0], torch.zeros(4)) and torch.equal(u[2], torch.zeros(4))
    assert u[1].norm() > 0


def test_control_cost_is_per_sample():
    u = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(control_cost(u, 2), torch.tensor([12.5, 0.0, 0.5]))
    torch.testing.assert_close(control_cost(u, 4), torch.tensor([625 / 4, 0.0, 0.25]))
    assert control_cost(torch.randn(7, 2, 3, 3), 3.5).shape == (7,)


@pytest.mark.parametrize("bad", [1, 1.0, 0.5, 0, -2, float("nan"), float("inf"), "two", None])
def test_bad_order_is_rejected(bad):
    with pytest.raises(ValueError, match="order"):
        check_order(bad)
    with pytest.raises(ValueError, match="> 1"):
        optimal_control(torch.ones(1, 2), bad)
    with pytest.raises(ValueError, match="order"):
        control_cost(torch.ones(1, 2), bad)


def test_non_integer_order_accepted():
    assert math.isclose(check_order("2.5"), 2.5)
