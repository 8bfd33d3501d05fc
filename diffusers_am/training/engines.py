"""What the trainer does differently under accelerate's FSDP2 (``fully_shard``), in one place.

Under FSDP2 the transformer's parameters are sharded DTensors: backward reduce-scatters (averages) the
gradients itself, so updates run without ``no_sync`` and without the manual all-reduce; the trainable
LoRA parameters are the sharded ones ``prepare`` registered; and a forward or a read of the weights by
one process alone (base evaluation, validation grids, saving the adapter) runs inside
:func:`full_params`, where every process first all-gathers the parameters. (Checkpoints through
``accelerator.save_state`` and the EMA are not adapted to FSDP2 yet.)
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
    # the LoRA's full tensors, gathered here by every process: FSDP2's state_dict hands out the shards, so
    # an adapter saved inside the block (PEFT's get_peft_model_state_dict reads module.state_dict()) reads these
    lora = {
        n: (v.full_tensor() if isinstance(v, DTensor) else v).detach()
        for n, v in module.state_dict().items() if "lora_" in n
    }
    module.state_dict = lambda *args, **kwargs: dict(lora)
    module.unshard()
    sharded = ctx.params, ctx.named_params
    names = set(ctx.named_params)
    ctx.named_params = {n: p for n, p in module.named_parameters() if n in names}
    ctx.params = list(ctx.named_params.values())
    try:
        yield
    finally:
        accelerator.wait_for_everyone()
        ctx.params, ctx.named_params = sharded
        del module.state_dict
        module.reshard()
