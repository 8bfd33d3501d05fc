"""Reward models: differentiable maps (images [B, C, H, W] in [0, 1], prompts) -> rewards [B].

A reward is any callable ``reward(images, prompts) -> Tensor[B]``. ``prompts`` is a list of
strings for text-to-image models, of class labels (ints) for class-conditional ones.
Each concrete reward does its own preprocessing (resize, crop, normalize) in torch, so that
gradients reach the images.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class RewardModel(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        """images [B, C, H, W] float in [0, 1]; returns [B]."""


def check_images(images: torch.Tensor, channels: Sequence[int] = (1, 3), name: str = "images") -> None:
    """Raise ValueError unless ``images`` is [B, C, H, W] with C in ``channels`` and values in [0, 1]."""
    if images.dim() != 4 or images.shape[1] not in tuple(channels):
        raise ValueError(
            f"`{name}` must be [B, C, H, W] with C in {tuple(channels)}; got shape {tuple(images.shape)}."
        )
    lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"`{name}` must be floats in [0, 1] (decode with x * 0.5 + 0.5); got range [{lo:.3f}, {hi:.3f}].")


def check_reward_output(rewards: Any, batch: int, name: str) -> torch.Tensor:
    """``rewards`` if it is a float Tensor [batch] (one value per image); ValueError naming ``name`` else."""
    if not isinstance(rewards, torch.Tensor):
        raise ValueError(
            f"reward {name!r} must return a torch.Tensor of shape [{batch}] (one value per image); "
            f"it returned a {type(rewards).__name__}."
        )
    if tuple(rewards.shape) != (batch,):
        raise ValueError(
            f"reward {name!r} must return one value per image, shape [{batch}]; "
            f"it returned shape {list(rewards.shape)}."
        )
    if not rewards.is_floating_point():
        raise ValueError(f"reward {name!r} must return floating-point values; it returned {rewards.dtype}.")
    return rewards


def probe_reward(reward: Callable, images: torch.Tensor, prompts: Sequence[Any], name: str) -> None:
    """Call ``reward`` once on ``images`` [B, C, H, W] (B >= 2) and check its contract before training:
    a float Tensor [B], differentiable with respect to the images. ValueError naming ``name`` otherwise."""
    x = images.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        out = check_reward_output(reward(x, list(prompts)), x.shape[0], name)
        grad = None
        if out.requires_grad:
            (grad,) = torch.autograd.grad(out.float().sum(), x, allow_unused=True)
    if grad is None:
        raise ValueError(
            f"reward {name!r} is not differentiable in the images (its output is detached from them, e.g. computed "
            "under no_grad, with numpy or .item()); the trained methods need grad r(x): compute it with torch ops."
        )


class WeightedReward(torch.nn.Module):
    """sum_i w_i * r_i(images, prompts)."""

    def __init__(self, rewards: dict[str, Callable], weights: dict[str, float]):
        super().__init__()
        self.names = list(rewards)
        self.weights = dict(weights)
        self.parts = torch.nn.ModuleDict({n: r for n, r in rewards.items() if isinstance(r, torch.nn.Module)})
        self._callables = {n: r for n, r in rewards.items() if not isinstance(r, torch.nn.Module)}
        self._recorded: list[dict[str, torch.Tensor]] | None = None

    def component(self, name: str) -> Callable:
        return self.parts[name] if name in self.parts else self._callables[name]

    def components(self, images: torch.Tensor, prompts: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Each unweighted component r_i [B] (fp32), by name."""
        return {name: self.component(name)(images, prompts).float() for name in self.names}

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_i w_i * r_i [B] of :meth:`components`' output."""
        total = None
        for name in self.names:
            r = self.weights[name] * components[name]
            total = r if total is None else total + r
        return total

    def forward(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        components = self.components(images, prompts)
        if self._recorded is not None:
            self._recorded.append({k: v.detach().float().cpu() for k, v in components.items()})
        return self.combine(components)

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[dict[str, torch.Tensor]]]:
        """For the duration, each call appends its unweighted components ``{name: r_i [B]}`` (detached, fp32,
        CPU) to the yielded list (the trainer logs their means as ``reward/<name>``)."""
        self._recorded = []
        try:
            yield self._recorded
        finally:
            self._recorded = None
