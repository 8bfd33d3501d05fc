"""What the trainer does differently under accelerate's FSDP2 (``fully_shard``), in one place.

Under FSDP2 the transformer's parameters are sharded DTensors: backward reduce-scatters (averages) the
gradients itself, so updates run without ``no_sync`` and without the manual all-reduce; the trainable
LoRA parameters are the sharded ones ``prepare`` registered; and a forward or a read of the weights by
one process alone (base evaluation, validation grids, saving the adapter) runs inside
:func:`full_params`, where every process first all-gathers the parameters. Checkpoints gather the LoRA
on every process (:func:`gathered_params`) before the main process writes it, and a resume scatters it back
(:func:`assign_full`); accelerate saves the sharded optimizer state itself. The EMA (``--use_ema``) is kept
over the full LoRA tensors, identical on every process (:func:`full_tensors`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def is_fsdp2(accelerator) -> bool:
    """True when accelerate prepared the model with FSDP2."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def trainable(module: torch.nn.Module) -> tuple[list[torch.nn.Parameter], dict[str, torch.nn.Parameter]]:
    """The module's trainable parameters, as a list and by name (re-read after ``prepare``)."""
    named = {n: p for n, p in module.named_parameters() if p.requires_grad}
    return list(named.values()), named


def full_tensors(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The full (all-gathered) value of each parameter, detached, with the parameter's ``requires_grad``;
    plain tensors are returned as they are. Every process must call this when any tensor is sharded."""
    from torch.distributed.tensor import DTensor

    return [
        p.detach().full_tensor().requires_grad_(p.requires_grad) if isinstance(p, DTensor) else p for p in params
    ]


def assign_full(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full tensor ``value`` into ``param`` (no grad), scattering it to the shards when ``param`` is
    a DTensor (every process must call this then, with the same ``value``)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
        param.copy_(value.to(param.device, param.dtype))


@contextlib.contextmanager
def full_params(ctx) -> Iterator[None]:
    """FSDP2: every process all-gathers the transformer's parameters for the block, ``ctx.params`` /
    ``ctx.named_params`` are the gathered LoRA tensors inside it, and all is resharded after it (every
    process must enter). A no-op for one process, DDP and DeepSpeed."""
    accelerator = ctx.accelerator
    if not is_fsdp2(accelerator):
        yield
        return
    from torch.distributed.tensor import DTensor

    module = ctx.train_module
    # FSDP2's state_dict hands out the shards, even unsharded: inside the block an adapter saved through
    # module.state_dict() (PEFT's get_peft_model_state_dict) reads the gathered LoRA instead, live (so the
    # EMA weights that ctx.ema_weights() copies into the gathered parameters are what it writes)
    gathered = {
        n: (v.full_tensor() if isinstance(v, DTensor) else v).detach()
        for n, v in module.state_dict().items() if "lora_" in n
    }
    module.unshard()
    live = dict(module.named_parameters())
    module.state_dict = lambda *args, **kwargs: {
        n: live[n].detach() if n in live else v for n, v in gathered.items()
    }
    sharded = ctx.params, ctx.named_params
    names = set(ctx.named_params)
    ctx.named_params = {n: p for n, p in live.items() if n in names}
    ctx.params = list(ctx.named_params.values())
    try:
        yield
    finally:
        accelerator.wait_for_everyone()
        ctx.params, ctx.named_params = sharded
        del module.state_dict
        module.reshard()


@contextlib.contextmanager
def gathered_params(ctx) -> Iterator[dict[str, torch.Tensor]]:
    """The trainable parameters by name, full on every process for the block (:func:`full_params`;
    ``ctx.named_params`` itself without FSDP2). Every process must enter."""
    with full_params(ctx):
        yield ctx.named_params
