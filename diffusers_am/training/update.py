"""One optimizer update over ``gradient_accumulation_steps`` micro-batches, and the in-sync check.

Per micro-batch: draw prompts (or labels) and noise (seeded by seed, step, process), encode, bind the
flow to the prepared transformer, run the method's step (it samples N steps without autograd and calls
``backward`` on the last K). Gradients are never synchronised inside the step (``no_sync``); after the
micro-batches they are all-reduced once, clipped, and the optimizer, LR schedule and EMA step. A NaN /
inf reward or gradient on any process skips the update on every process. Under FSDP2 each backward
reduce-scatters instead, and under DeepSpeed the engine reduces, clips and steps (:mod:`.engines`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from accelerate.logging import get_logger

from ..objectives import NonFiniteRewardError
from ..prompts import PromptSampler, derive_seed
from ..rewards.base import WeightedReward
from .context import RunContext
from .engines import any_process, deepspeed_step, full_tensors, gradient_sync_deferred, is_deepspeed, is_fsdp2
from .engines import backward as engine_backward

logger = get_logger(__name__)  # main process only


def run_update(
    ctx: RunContext, sampler: PromptSampler, step: int, *, truncate_steps: int, reward_scale: float
) -> dict[str, Any]:
    """Update ``step + 1`` (0-based ``step``) with K = ``truncate_steps`` and lambda = ``reward_scale`` (as the run
    uses them: adaptive / matched ones included): accumulate, agree on skipping, all-reduce, clip and step;
    returns its log record."""
    with _recording(ctx.reward) as components:
        rewards, losses, norms, skipped = _accumulate(ctx, sampler, step, truncate_steps, reward_scale)
    accelerator = ctx.accelerator
    # every process agrees on skipping, then one all-reduce of the gradients
    skipped = any_process(accelerator, skipped)
    skipped, grad_norm = _apply(ctx, skipped, step)
    record = _record(ctx, rewards, losses, norms, skipped, grad_norm, truncate_steps)
    if components is not None:
        record.update(component_means(accelerator, ctx.reward.names, components))
    return record


def _recording(reward: Any) -> contextlib.AbstractContextManager:
    """A weighted reward's :meth:`WeightedReward.recording` (its components per call), else a no-op yielding None."""
    return reward.recording() if isinstance(reward, WeightedReward) else contextlib.nullcontext()


def component_means(accelerator, names: list[str], calls: list[dict[str, torch.Tensor]]) -> dict[str, float | None]:
    """``{"reward/<name>": mean}`` of each weighted reward component over this update's reward calls on every
    process (finite values only; None when there were none)."""
    stats = torch.zeros(2 * len(names), dtype=torch.float64)
    for values in calls:
        for i, name in enumerate(names):
            v = values[name].double()
            v = v[torch.isfinite(v)]
            stats[2 * i] += v.sum()
            stats[2 * i + 1] += v.numel()
    stats = accelerator.reduce(stats.to(accelerator.device), "sum").cpu()
    return {
        f"reward/{name}": float(stats[2 * i] / stats[2 * i + 1]) if stats[2 * i + 1] > 0 else None
        for i, name in enumerate(names)
    }


def _accumulate(
    ctx: RunContext, sampler: PromptSampler, step: int, truncate_steps: int, reward_scale: float
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], bool]:
    """Run the method's step on each micro-batch (backward only, no optimizer step).

    Returns (rewards [G*B], NaN where not run; losses; control-norm profiles; skipped on this process)."""
    cfg, accelerator, adapter, method = ctx.config, ctx.accelerator, ctx.adapter, ctx.method
    rank, accum, batch_size = accelerator.process_index, cfg.gradient_accumulation_steps, cfg.train_batch_size
    rewards = torch.full((accum * batch_size,), float("nan"))
    losses, norms, skipped = [], [], False

    def backward(loss: torch.Tensor) -> None:
        engine_backward(accelerator, ctx.train_module, loss / accum)

    for micro in range(accum):
        slot = rank * accum + micro  # P processes x G micro-batches draw what 1 x P*G would
        batch = sampler.batch(step, batch_size, slot)
        noise_gen = torch.Generator(device=adapter.device).manual_seed(derive_seed(cfg.seed, "noise", step, slot))
        noise = adapter.initial_noise(batch_size, ctx.resolution, noise_gen)
        flow = adapter.flow(
            adapter.encode_conditions(batch), guidance_scale=cfg.guidance_scale, train_module=ctx.train_module
        )
        draws = method.draws(cfg.seed, step, slot, adapter.device) if method.draws is not None else {}
        reward_fn = BatchReward(ctx.reward, adapter.decode, batch)

        try:
            with gradient_sync_deferred(accelerator, ctx.train_module), accelerator.autocast():
                out = method.step(
                    flow, noise, ctx.times, reward_fn, truncate_steps=truncate_steps, reward_scale=reward_scale,
                    backward=backward, **ctx.method_options, **draws,
                )
        except NonFiniteRewardError as err:
            logger.warning(f"update {step + 1}: {err}; skipping this update (nothing is applied).")
            skipped = True
            break
        rewards[micro * batch_size : (micro + 1) * batch_size] = out.reward.detach().float().cpu()
        losses.append(out.loss)
        norms.append(out.control_norm_per_step.detach().float().cpu())
    return rewards, losses, norms, skipped


class BatchReward:
    """``reward_fn(x) -> [B]`` of one batch: decode the states, score them against the batch's conditions.

    ``rows(slice)`` gives the reward of part of the batch, so micro-batches decode and score only their rows."""

    def __init__(self, reward: Callable, decode: Callable, conditions: list):
        self.reward, self.decode, self.conditions = reward, decode, conditions

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.reward(self.decode(x), self.conditions)

    def rows(self, rows: slice) -> "BatchReward":
        return BatchReward(self.reward, self.decode, self.conditions[rows])


def _apply(ctx: RunContext, skipped: bool, step: int) -> tuple[bool, float | None]:
    """All-reduce, clip and step (optimizer, LR schedule, EMA) unless skipped; returns (skipped, grad norm)."""
    accelerator, optimizer = ctx.accelerator, ctx.optimizer
    grad_norm = None
    if is_deepspeed(accelerator):  # the engine reduces, clips and steps (and skips a non-finite gradient)
        skipped, grad_norm = deepspeed_step(ctx.train_module, skipped)
        if skipped and grad_norm is not None:
            logger.warning(f"update {step + 1}: the gradient norm is {grad_norm}; skipping this update.")
    elif not skipped:
        if not is_fsdp2(accelerator):  # FSDP2's backward already averaged the gradients over processes
            all_reduce_grads(accelerator, ctx.params)
        grad_norm = float(accelerator.clip_grad_norm_(ctx.params, ctx.config.max_grad_norm))
        if not math.isfinite(grad_norm):
            logger.warning(f"update {step + 1}: the gradient norm is {grad_norm}; skipping this update.")
            skipped = True
            if accelerator.scaler is not None:  # fp16: the GradScaler skips the step and lowers its scale
                optimizer.step()
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()  # a no-op under DeepSpeed (the engine stepped)
        ctx.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ctx.ema is not None:
            ctx.ema.step(full_tensors(ctx.params))  # FSDP2: the EMA is over the full LoRA tensors
    return skipped, grad_norm


def _record(
    ctx: RunContext,
    rewards: torch.Tensor,
    losses: list[torch.Tensor],
    norms: list[torch.Tensor],
    skipped: bool,
    grad_norm: float | None,
    truncate_steps: int,
) -> dict[str, Any]:
    """The update's log record: reward, loss and control-norm profile over all processes."""
    accelerator = ctx.accelerator
    all_rewards = accelerator.gather(rewards.to(accelerator.device)).float().cpu()
    finite = all_rewards[torch.isfinite(all_rewards)]
    loss = torch.tensor(
        [sum(losses) / len(losses) if losses and not skipped else float("nan")], device=accelerator.device
    )
    loss = float(accelerator.reduce(loss, "mean").item())
    profile = (
        torch.stack(norms).mean(0)
        if norms and not skipped
        else torch.full((ctx.method.profile_length(truncate_steps),), float("nan"))
    )
    profile = accelerator.reduce(profile.to(accelerator.device), "mean").cpu() if not skipped else profile
    return {
        "reward_mean": float(finite.mean()) if finite.numel() else None,
        "reward_std": float(finite.std(unbiased=False)) if finite.numel() else None,
        "loss": loss if math.isfinite(loss) else None,
        "grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
        "control_norm_per_step": [float(v) if math.isfinite(v) else None for v in profile.tolist()],
        "skipped": skipped,
        "truncate_steps": truncate_steps,
    }


def all_reduce_grads(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average the gradients over processes with one flat all-reduce (no-op on one process)."""
    if accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = accelerator.reduce(flat, "mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def check_in_sync(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Raise if the LoRA weights differ between processes (they must after identical updates)."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    sig = torch.stack(
        [flat.sum(), flat.abs().sum(), (flat * torch.arange(flat.numel(), device=flat.device) % 7).sum()]
    )
    sigs = accelerator.gather(sig.reshape(1, -1))
    if not torch.equal(sigs.min(0).values, sigs.max(0).values):
        raise RuntimeError(f"the LoRA weights differ between processes after training: {sigs.tolist()}")
