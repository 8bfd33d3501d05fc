"""What differs between processes and engines: FSDP2, DeepSpeed ZeRO-2, agreement between processes, and
``--compile``.

Under FSDP2 the transformer's parameters are sharded DTensors: backward reduce-scatters (averages) the
gradients itself, so updates run without ``no_sync`` and without the manual all-reduce; the trainable
LoRA parameters are the sharded ones ``prepare`` registered; and a forward or a read of the weights by
one process alone (base evaluation, validation grids, saving the adapter) runs inside
:func:`full_params`, where every process first all-gathers the parameters. Checkpoints gather the LoRA
on every process (:func:`gathered_params`) before the main process writes it, and a resume scatters it back
(:func:`assign_full`); accelerate saves the sharded optimizer state itself. The EMA (``--use_ema``) is kept
over the full LoRA tensors, identical on every process (:func:`full_tensors`).

Under DeepSpeed ZeRO-2 (:func:`configure_deepspeed` before ``prepare``) the engine owns the gradients: every
backward of an update goes through ``engine.backward`` with the engine's own accumulation off
(``managed_gradient_accumulation: false``), and one ``engine.step()`` per update reduces, clips to
``--max_grad_norm`` and steps (:func:`backward`, :func:`deepspeed_step`). The parameters stay whole on every
process, so everything else (saving, the EMA, the base model's VJP through the unwrapped transformer) is
the one-process code.

Agreement between processes (:func:`any_process`, :func:`max_over_processes`): every rank takes the same
decision (no-ops on one process).

``--compile``: regional compilation of the transformer's repeated blocks with ``torch.compile``.

Each repeated block (the classes a diffusers model lists in ``_repeated_blocks``, else every module of a
``transformer_blocks`` / ``single_transformer_blocks`` ModuleList) is compiled in place, after the LoRA
is added; the rest of the model runs eagerly. Compilation happens lazily in the first update.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..errors import UserError


def is_fsdp2(accelerator) -> bool:
    """True when accelerate prepared the model with FSDP2."""
    return bool(getattr(accelerator, "is_fsdp2", False))


def is_deepspeed(accelerator) -> bool:
    """True when accelerate runs the model through a DeepSpeed engine."""
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """DeepSpeed, before ``prepare``: the engine's batch is ``micro_batch`` prompts per process (there is no
    dataloader to read it from), it accumulates nothing itself (the trainer calls ``engine.step()`` once per
    update, after all of the update's backwards) and clips to ``max_grad_norm``. ValueError (one line)
    when the installed DeepSpeed cannot leave the accumulation boundary to the caller."""
    from deepspeed.runtime import constants

    if not hasattr(constants, "MANAGED_GRADIENT_ACCUMULATION"):
        import deepspeed

        raise UserError(
            f"DeepSpeed {deepspeed.__version__} cannot leave the gradient accumulation boundary to the trainer "
            "(an adjoint-matching update calls backward once per fine-tuned step); upgrade with "
            "`pip install -U deepspeed` (0.19.8 works)."
        )
    accelerator.state.deepspeed_plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=1,
        gradient_clipping=max_grad_norm,
        managed_gradient_accumulation=False,
    )


def backward(accelerator, module: torch.nn.Module, loss: torch.Tensor) -> None:
    """``loss.backward()`` the engine's way: ``accelerator.backward``, or under DeepSpeed ``engine.backward``
    without its optimizer step (ZeRO-2 reduces the gradients into their partitions there)."""
    if is_deepspeed(accelerator):
        module.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def gradient_sync_deferred(accelerator, module: torch.nn.Module) -> contextlib.AbstractContextManager:
    """The context an update's backwards run in: ``accelerator.no_sync`` (the trainer all-reduces once after
    them), or nothing under FSDP2 (it reduce-scatters in every backward; its no_sync would keep the gradients
    off the shards) and DeepSpeed (the engine reduces)."""
    if is_fsdp2(accelerator) or is_deepspeed(accelerator):
        return contextlib.nullcontext()
    return accelerator.no_sync(module)


def deepspeed_step(engine, skipped: bool) -> tuple[bool, float | None]:
    """End a DeepSpeed update: discard the gradients when ``skipped``, else ``engine.step()`` (reduce, clip,
    step; it skips by itself when the gradient norm is NaN / inf, the same on every process). Returns
    (skipped, the gradient norm before clipping or None)."""
    if skipped:
        engine.optimizer.zero_grad(set_to_none=True)
        return True, None
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    return not engine.was_step_applied(), norm


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


# -- agreement between processes -----------------------------------------------------------------------------

def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one (one small all-reduce)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    total = accelerator.reduce(torch.tensor([float(bool(flag))], device=accelerator.device), "sum")
    return bool(total.item() > 0)


def max_over_processes(accelerator, value: int) -> int:
    """The largest ``value`` over the processes, on every process."""
    if accelerator.num_processes == 1:
        return int(value)
    values = accelerator.gather(torch.tensor([int(value)], device=accelerator.device))
    return int(values.max().item())


# -- --compile: regional compilation -------------------------------------------------------------------------

def compile_repeated_blocks(model: torch.nn.Module, **compile_kwargs) -> int:
    """Compile each repeated block of ``model`` in place; returns how many. ValueError when it has none."""
    names = set(getattr(model, "_repeated_blocks", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        for attr in ("transformer_blocks", "single_transformer_blocks", "blocks"):
            container = getattr(model, attr, None)
            if isinstance(container, torch.nn.ModuleList):
                blocks.extend(container)
    if not blocks:
        raise UserError(
            f"`--compile`: {type(model).__name__} declares no repeated blocks (`_repeated_blocks` or a "
            "`transformer_blocks` list); drop the flag."
        )
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
