"""The end of a run: the adapter (EMA weights when kept), final grid, reward after, summary, model card
and the Hub upload, written by the main process into ``output_dir``.

The adapter is written to ``.tmp-adapter/`` and moved into place, so an interrupted or failed write (a
full disk) never leaves a truncated ``pytorch_lora_weights.safetensors``."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..filemode import match_umask
from ..jsonio import write_json
from ..models import EMBEDDED_DIGITS_BASE
from .logs import LOG_NAME
from .objects import is_object_record
from .result import TrainResult
from .validation import COMPARISON_NAME, VALIDATION_LOG_NAME, eval_reward, validation_grid, write_comparison

if TYPE_CHECKING:
    from .context import RunContext

CONFIG_NAME = "training_config.json"
ADAPTER_NAME = "pytorch_lora_weights.safetensors"
CARD_NAME = "README.md"
GRID_NAME = "samples.png"
SUMMARY_NAME = "train_summary.json"
ADAPTER_TMP = ".tmp-adapter"
OUTPUT_NAMES = (ADAPTER_NAME, ADAPTER_TMP, CARD_NAME, GRID_NAME, COMPARISON_NAME, SUMMARY_NAME)
"""Top-level entries of output_dir written here."""


def save_adapter(ctx: RunContext) -> Path:
    """Write the adapter (the EMA weights with ``--use_ema``) to ``output_dir`` atomically; returns its path.

    Raises RuntimeError (nothing written) when the weights are not finite."""
    out = ctx.output_dir
    with ctx.ema_weights():
        if not all(torch.isfinite(p).all() for p in ctx.params):
            raise RuntimeError("the LoRA weights are not finite; the adapter was not written.")
        tmp = out / ADAPTER_TMP
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            ctx.adapter.save_lora(str(tmp))
            match_umask(tmp / ADAPTER_NAME)  # safetensors writes 0600
            os.replace(tmp / ADAPTER_NAME, out / ADAPTER_NAME)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out / ADAPTER_NAME


def write_outputs(ctx: RunContext, result: TrainResult, last: dict[str, Any], repo_id: str) -> TrainResult:
    """Write the finished run (main process), then wait for every process; returns ``result`` with the
    fine-tuned model's ``reward_after`` (a new object: ``result`` is not changed).

    ``last`` is the last update's log record (the card's final metrics); ``repo_id`` the Hub repo."""
    cfg, accelerator, out = ctx.config, ctx.accelerator, ctx.output_dir
    if accelerator.is_main_process:
        save_adapter(ctx)
        with ctx.ema_weights():
            validation_grid(ctx, "validation/final.png", step=result.steps)
            shutil.copyfile(out / "validation/final.png", out / GRID_NAME)
            write_comparison(ctx, result.steps)
            if cfg.num_eval_samples:
                result = dataclasses.replace(result, reward_after=eval_reward(ctx, base=False))
        summary = {
            "reward_before": result.reward_before,
            "reward_after": result.reward_after,
            "steps": result.steps,
            "skipped_updates": result.skipped_updates,
            "seconds_per_update": result.seconds_per_update,
            "num_processes": accelerator.num_processes,
            "num_eval_samples": len(ctx.eval_set[0]),
            "reward_scale": ctx.reward_scale,
            "reward_scale_match": ctx.reward_scale_match,
            "truncate_steps": ctx.k_steps,
            "truncate_steps_history": None if ctx.truncation is None else [list(h) for h in ctx.truncation.history],
        }
        write_json(out / SUMMARY_NAME, summary)
        write_model_card(ctx, result, last, repo_id)
        if accelerator.trackers:
            accelerator.log(
                {"reward_before": result.reward_before, "reward_after": result.reward_after}, step=result.steps
            )
        if cfg.push_to_hub:
            push(ctx, repo_id)
    accelerator.wait_for_everyone()
    return result


def push(ctx: RunContext, repo_id: str) -> None:
    """Upload the finished run (adapter, card, grids, config, logs; no checkpoints) to ``repo_id``;
    RunStopped (exit 1) with one line when the upload fails: the run itself is complete on disk."""
    from .errors import RunStopped
    from .hub import upload_output_dir

    cfg, out = ctx.config, ctx.output_dir
    files = [ADAPTER_NAME, CARD_NAME, GRID_NAME, COMPARISON_NAME, SUMMARY_NAME, CONFIG_NAME, LOG_NAME]
    files.append(VALIDATION_LOG_NAME)
    files.append("validation/*")
    try:
        url = upload_output_dir(out, repo_id, files, token=cfg.hub_token)
    except Exception as err:  # network and HTTP errors of huggingface_hub
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise RunStopped(
            f"the run is complete in {str(out)!r}, but the upload to {repo_id!r} failed ({reason}); upload it later "
            f"with `hf upload {repo_id} {out} --exclude 'checkpoint-*' --exclude '.*'`.",
            exit_code=1,
        ) from None
    ctx.accelerator.print(f"pushed to {url}")


def write_model_card(ctx: RunContext, result: TrainResult, last: dict[str, Any], repo_id: str) -> None:
    """``README.md``: the model card of the adapter (``model_card_template.md``)."""
    from .model_card import render_model_card
    from ..models.quantize import describe as describe_quantization
    from .resume_policy import learning_rate_text

    cfg, model_adapter = ctx.config, ctx.adapter
    base = cfg.pretrained_model_name_or_path or str(EMBEDDED_DIGITS_BASE)
    if is_object_record(base):  # a pipeline passed from Python: the folder or Hub id it was loaded from, if known
        base = str(getattr(model_adapter.pipeline, "name_or_path", None) or base)
    final = {k: last.get(k) for k in ("reward_mean", "reward_std", "loss", "grad_norm")}
    card = render_model_card(
        base_model=base,
        method=cfg.method,
        truncate_steps=truncation_text(ctx),
        num_inference_steps=ctx.n_steps,
        reg_order=cfg.reg_order,
        reward=cfg.reward,
        reward_scale=reward_scale_text(ctx),
        steps=result.steps,
        reward_before=result.reward_before,
        reward_after=result.reward_after,
        final_metrics=final,
        grid=GRID_NAME,
        base_grid="validation/base.png" if (ctx.output_dir / "validation/base.png").is_file() else None,
        pipeline_class=type(model_adapter.pipeline).__name__,
        pipeline_module=type(model_adapter.pipeline).__module__,
        adapter_location=repo_id if cfg.push_to_hub else str(ctx.output_dir),
        conditioning=model_adapter.conditioning,
        num_eval_samples=cfg.num_eval_samples,
        batch_size=f"{cfg.train_batch_size} x {ctx.accelerator.num_processes} x {cfg.gradient_accumulation_steps}",
        learning_rate=learning_rate_text(ctx.lr_history, result.steps) if ctx.lr_history else cfg.learning_rate,
        lr_scheduler=cfg.lr_scheduler,
        rank=cfg.rank,
        lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else cfg.rank,
        use_ema=cfg.use_ema,
        base_quantization=describe_quantization(model_adapter.pipeline),
    )
    card.save(str(result.card_path))


def truncation_text(ctx: RunContext) -> str | int:
    """K as the card shows it: the fixed K, or 'auto' with the windows the probes picked."""
    if ctx.truncation is None:
        return ctx.k_steps
    ks = [k for _, k in ctx.truncation.history] or [ctx.k_steps]
    spread = f"{min(ks)}-{max(ks)}" if min(ks) != max(ks) else f"{ks[0]}"
    return f"{spread} (auto: the window holding {ctx.config.truncate_share:g} of the control energy)"


def reward_scale_text(ctx: RunContext) -> str | float:
    """lambda as the card shows it: the one used, and what it was matched to."""
    match = ctx.reward_scale_match
    if match is None:
        return ctx.reward_scale
    return (
        f"{ctx.reward_scale:.4g} (matched by {match['statistic']} to 2nd-order ODE-AM at lambda = "
        f"{match['reference_reward_scale']:g}, --match_reward_scale)"
    )
