"""Train a control on the Gaussian toy with the library's ODE-AM step, and measure it against the
closed forms of :mod:`diffusers_am.toy.gaussian` (paper time, fp32 training, fp64 references)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..checks import positive_int
from ..control import check_order, optimal_control
from ..flow import check_time_grid, check_truncation, sample_euler
from ..objectives import ode_am_step
from .gaussian import GaussianToy, MLPControl, ToyControlledFlow


@dataclass
class ControlError:
    """Relative L2 errors of a learned control over the trained window.

    continuous: || u_theta(X_k, t_k) - u*(t_k) || / || u*(t_k) || against the closed-form u*(t).
    discrete: the same against the Euler optimum phi_p(a~_k) of the discrete lean adjoint (what
        ODE-AM regresses onto on this grid; differs from u*(t) by O(dt)).
    times: [K] the window times t_{N-K} .. t_{N-1}.
    learned_mean: [K] batch mean of u_theta(X_k, t_k).
    """

    continuous: float
    discrete: float
    times: torch.Tensor
    learned_mean: torch.Tensor


def train_toy_control(
    toy: GaussianToy,
    *,
    order: float = 2.0,
    num_steps: int = 50,
    truncate_steps: int | None = None,
    iterations: int = 100,
    batch_size: int = 32,
    lr: float = 2e-2,
    hidden: int = 32,
    grad_clip: float = 10.0,
    seed: int = 0,
) -> tuple[ToyControlledFlow, list[float]]:
    """Fit an :class:`MLPControl` with ``ode_am_step`` on a uniform grid of ``num_steps`` Euler steps,
    control window = the last ``truncate_steps`` (K, default N) steps. Adam (0.9, 0.99), cosine decay.

    Returns the trained flow (control gated to the window) and the loss of every iteration.
    """
    order = check_order(order)
    times = uniform_grid(num_steps)
    k = check_truncation(num_steps if truncate_steps is None else truncate_steps, int(num_steps))
    for name, value in (("iterations", iterations), ("batch_size", batch_size), ("hidden", hidden)):
        positive_int(value, name)
    if not lr > 0 or not grad_clip > 0:
        raise UserError(f"`lr` and `grad_clip` must be > 0; got lr={lr!r}, grad_clip={grad_clip!r}.")
    generator = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):  # seed the MLP's initial weights, leave the global RNG alone
        torch.manual_seed(int(seed))
        control = MLPControl(hidden=int(hidden))
    flow = ToyControlledFlow(toy, control, control_start=float(times[num_steps - k]))
    params = [p for p in flow.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, int(iterations))
    losses = []
    for _ in range(int(iterations)):
        optimizer.zero_grad(set_to_none=True)
        noise = torch.randn(int(batch_size), 1, generator=generator)
        out = ode_am_step(
            flow, noise, times, toy.reward, truncate_steps=k, order=order, reward_scale=toy.reward_scale
        )
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(out.loss)
    return flow, losses


def uniform_grid(num_steps: int) -> torch.Tensor:
    """[N+1] fp32 paper times 0, 1/N, ..., 1."""
    return torch.linspace(0.0, 1.0, positive_int(num_steps, "num_steps") + 1)


@torch.no_grad()
def control_error(
    flow: ToyControlledFlow,
    times: torch.Tensor,
    truncate_steps: int,
    order: float,
    *,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
) -> ControlError:
    """Relative L2 error of ``flow``'s control on the states X_{N-K} .. X_{N-1} it visits (fresh
    noise, Euler on ``times``), against u*(t_k) and against the discrete Euler optimum."""
    check_time_grid(times)
    n = times.shape[0] - 1
    k_steps = check_truncation(truncate_steps, n)
    order = check_order(order)
    noise = torch.randn(int(batch_size), 1, generator=generator)
    states = sample_euler(flow.velocity, noise, times, record_last=k_steps + 1)
    window = times[n - k_steps :]
    toy = flow.toy
    u_cont = toy.optimal_control(window[:-1].double(), order)
    a_disc = toy.euler_lean_adjoint(window)[:-1]
    u_disc = optimal_control(a_disc.reshape(-1, 1), order).reshape(-1)
    learned = torch.stack([flow.control_value(states[j], window[j]).double().reshape(-1) for j in range(k_steps)])
    return ControlError(
        continuous=_relative_l2(learned, u_cont),
        discrete=_relative_l2(learned, u_disc),
        times=window[:-1].clone(),
        learned_mean=learned.mean(1),
    )


def _relative_l2(learned: torch.Tensor, reference: torch.Tensor) -> float:
    """learned [K, B] vs reference [K]: sqrt(sum_k mean_b (l - r)^2 / sum_k r^2)."""
    err = (learned - reference[:, None]).pow(2).mean(1).sum()
    return float((err / reference.pow(2).sum()).sqrt())


@torch.no_grad()
def simulated_mean_shift(
    flow: ToyControlledFlow,
    *,
    num_steps: int = 2000,
    batch_size: int = 1024,
    generator: torch.Generator | None = None,
) -> float:
    """E X_1 (controlled) - E X_1 (base), by Euler on a fine uniform grid over the control window
    [t_s, 1], both flows from the same X_{t_s} ~ N(t_s m, D(t_s)) (the flows agree before t_s)."""
    toy = flow.toy
    t_s = flow.control_start
    times = t_s + (1.0 - t_s) * uniform_grid(num_steps).double()
    start = t_s * toy.mean + float(toy.variance(t_s)) ** 0.5 * torch.randn(
        int(batch_size), 1, generator=generator, dtype=torch.float64
    )
    def controlled_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return toy.base_velocity(x, t) + flow.control_value(x.float(), t.float()).double()

    controlled = sample_euler(controlled_velocity, start, times)[-1]
    base = sample_euler(toy.base_velocity, start, times)[-1]
    return float((controlled - base).mean())
