"""The one reward-scoring function of validation and evaluation: a reward (or a weighted combination)
on a batch of images, in chunks, without gradients."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..errors import UserError
from .base import WeightedReward, check_reward_output


@torch.no_grad()
def score_rewards(
    reward: Callable, images: torch.Tensor, conditions: Sequence[Any], *, batch_size: int = 32, name: str = "reward"
) -> dict[str, torch.Tensor]:
    """Rewards of images [B, C, H, W] in [0, 1] for ``conditions`` (B prompts or labels), fp32 on CPU.

    Returns ``{name: r [B]}``; for a :class:`WeightedReward` also ``{f"{name}/{component}": r_i [B]}``
    (unweighted), with ``r = sum_i w_i r_i`` (the value the reward itself returns)."""
    if len(conditions) != images.shape[0]:
        raise UserError(f"`conditions` has {len(conditions)} entries for {images.shape[0]} images: pass one per image.")
    parts: dict[str, list[torch.Tensor]] = {}
    for s in range(0, images.shape[0], batch_size):
        chunk, prompts = images[s : s + batch_size], list(conditions[s : s + batch_size])
        if isinstance(reward, WeightedReward):
            comps = {k: check_reward_output(v, chunk.shape[0], f"{name}/{k}") for k, v in reward.components(chunk, prompts).items()}
            values = {name: reward.combine(comps), **{f"{name}/{k}": v for k, v in comps.items()}}
        else:
            values = {name: check_reward_output(reward(chunk, prompts), chunk.shape[0], name)}
        for k, v in values.items():
            parts.setdefault(k, []).append(v.float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}
