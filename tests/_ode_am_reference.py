"""ODE-AM's loss and LoRA gradient on a model adapter, written out without the library's adjoint code.

Euler with the fine-tuned velocity (no grad), the lean adjoint by plain autograd through the base velocity
(the adapter switched off by the transformer's own ``disable_adapters``) over the last K steps, p = 2
targets -a~_k, and the loss (1/K) sum_k E |v_theta(X_k) - b(X_k) + a~_k|^2 differentiated by autograd.
"""

from __future__ import annotations

import torch


def ode_am_reference(adapter, flow, noise, times, reward_fn, params, *, truncate_steps: int, reward_scale: float):
    """(loss, [grad of each parameter in ``params``]) of one ODE-AM step of order 2 (the grads are cleared after)."""
    n, k = times.shape[0] - 1, truncate_steps
    x, states = noise, [noise]
    with torch.no_grad():
        for i in range(n):
            x = x + (times[i + 1] - times[i]) * flow.velocity(x, times[i])
            states.append(x)
    xn = states[-1].detach().requires_grad_(True)
    (grad_r,) = torch.autograd.grad(reward_fn(xn).sum(), xn)
    a, adjoints, base = -reward_scale * grad_r, {}, {}
    adapter.transformer.disable_adapters()
    try:
        for i in range(n - 1, n - k - 1, -1):
            xi = states[i].detach().requires_grad_(True)
            b = flow.velocity(xi, times[i])
            (jt_a,) = torch.autograd.grad(b, xi, grad_outputs=a)
            a = a + (times[i + 1] - times[i]) * jt_a
            adjoints[i], base[i] = a.detach(), b.detach()
    finally:
        adapter.transformer.enable_adapters()
    for p in params:
        p.grad = None
    loss = sum(
        (flow.velocity(states[i], times[i]) - base[i] + adjoints[i]).pow(2).flatten(1).sum(1).mean() for i in adjoints
    ) / k
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return float(loss.detach()), grads
