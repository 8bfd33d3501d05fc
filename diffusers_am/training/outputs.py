"""The end of a run: the adapter (EMA weights when kept), final grid, reward after, summary, model card
and the Hub upload, written by the main process into ``output_dir``; and the ``TrainResult`` returned.

The adapter is written to ``.tmp-adapter/`` and moved into place, so an interrupted or failed write (a
full disk) never leaves a truncated ``pytorch_lora_weights.safetensors``.

The Hugging Face Hub side of ``--push_to_hub``: the repo is created (or checked) at set-up, before any
training, so an offline machine or a missing login fails at once with one line; the finished run's
adapter, card, grids and logs are uploaded at the end (never checkpoints, or files the run did not write).

The model card: ``model_card_template.md`` rendered with ``huggingface_hub.ModelCard``; the template is
package data beside this module (an installed wheel carries it); the top-level
``model_card_template.md`` of the repository is a symlink to it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import RunStopped, UserError
from ..filemode import match_umask
from ..jsonio import write_json
from ..models import EMBEDDED_DIGITS_BASE, EMBEDDED_NAMES
from ..models.quantize import describe as describe_quantization
from .checkpoints import learning_rate_text
from .config import is_object_record
from .context import RunContext
from .layout import (
    ADAPTER_NAME,
    ADAPTER_TMP,
    BASE_GRID_NAME,
    CARD_NAME,
    COMPARISON_NAME,
    CONFIG_NAME,
    FINAL_GRID_NAME,
    GRID_NAME,
    LOG_NAME,
    SUMMARY_NAME,
    VALIDATION_DIR,
    VALIDATION_LOG_NAME,
)
from .methods import METHODS
from .probes import ControlProbes
from .validation import eval_reward, validation_grid, write_comparison


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


def write_outputs(
    ctx: RunContext, probes: ControlProbes, result: TrainResult, last: dict[str, Any], repo_id: str
) -> TrainResult:
    """Write the finished run (main process), then wait for every process; returns ``result`` with the
    fine-tuned model's ``reward_after`` (a new object: ``result`` is not changed).

    ``last`` is the last update's log record (the card's final metrics); ``repo_id`` the Hub repo."""
    cfg, accelerator, out = ctx.config, ctx.accelerator, ctx.output_dir
    if accelerator.is_main_process:
        save_adapter(ctx)
        with ctx.ema_weights():
            validation_grid(ctx, FINAL_GRID_NAME, step=result.steps)
            shutil.copyfile(out / FINAL_GRID_NAME, out / GRID_NAME)
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
            **probes.summary(),
        }
        write_json(out / SUMMARY_NAME, summary)
        write_model_card(ctx, probes, result, last, repo_id)
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

    cfg, out = ctx.config, ctx.output_dir
    files = [ADAPTER_NAME, CARD_NAME, GRID_NAME, COMPARISON_NAME, SUMMARY_NAME, CONFIG_NAME, LOG_NAME]
    files.append(VALIDATION_LOG_NAME)
    files.append(f"{VALIDATION_DIR}/*")
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


def write_model_card(
    ctx: RunContext, probes: ControlProbes, result: TrainResult, last: dict[str, Any], repo_id: str
) -> None:
    """``README.md``: the model card of the adapter (``model_card_template.md``)."""

    cfg, model_adapter = ctx.config, ctx.adapter
    base = cfg.pretrained_model_name_or_path or str(EMBEDDED_DIGITS_BASE)
    if is_object_record(base):  # a pipeline passed from Python: the folder or Hub id it was loaded from, if known
        base = str(getattr(model_adapter.pipeline, "name_or_path", None) or base)
    final = {k: last.get(k) for k in ("reward_mean", "reward_std", "loss", "grad_norm")}
    card = render_model_card(
        base_model=base,
        method=cfg.method,
        truncate_steps=probes.truncation_text(),
        num_inference_steps=ctx.n_steps,
        reg_order=cfg.reg_order,
        reward=cfg.reward,
        reward_scale=probes.reward_scale_text(),
        steps=result.steps,
        reward_before=result.reward_before,
        reward_after=result.reward_after,
        final_metrics=final,
        grid=GRID_NAME,
        base_grid=BASE_GRID_NAME if (ctx.output_dir / BASE_GRID_NAME).is_file() else None,
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


# -- the result of train() -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainResult:
    """Where a finished run put things, and its headline numbers.

    ``reward_before`` / ``reward_after`` are the mean training reward of the base and the fine-tuned model on
    the fixed eval set (None with ``num_eval_samples=0``, on other processes than the main one, or when every
    reward was NaN); ``seconds_per_update`` the mean wall time of the updates run here."""

    output_dir: Path
    adapter_path: Path
    grid_path: Path
    card_path: Path
    log_path: Path
    reward_before: float | None
    reward_after: float | None
    steps: int
    skipped_updates: int
    seconds_per_update: float | None


# -- the Hub upload ------------------------------------------------------------------------------------------

def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def prepare_repo(repo_id: str, token: str | None = None) -> str:
    """``create_repo(repo_id, exist_ok=True)``; returns the full repo id (``user/name``).

    ValueError with one line when the Hub is offline (``HF_HUB_OFFLINE``), unreachable, or refuses (no login,
    no write access, a bad repo id). The token is only passed through."""
    from huggingface_hub import constants, create_repo

    if not repo_id or not str(repo_id).strip():
        raise UserError("`--hub_model_id` must be a repo id like 'user/my-adapter'.")
    if constants.HF_HUB_OFFLINE:
        raise UserError(
            "`--push_to_hub`: the Hub is offline here (HF_HUB_OFFLINE is set); unset it, or drop `--push_to_hub` "
            "and upload the output folder later."
        )
    try:
        url = create_repo(repo_id, exist_ok=True, token=token)
    except Exception as err:  # network errors (httpx), HTTP errors (401, 403), HFValidationError ...
        raise UserError(
            f"`--push_to_hub`: cannot create or reach the Hub repo {repo_id!r} ({_reason(err)}); check the network "
            "and your login (`hf auth login`), or drop `--push_to_hub`."
        ) from None
    return getattr(url, "repo_id", repo_id)


def upload_output_dir(
    output_dir: str | Path,
    repo_id: str,
    files: Sequence[str],
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """``upload_folder`` of the run's ``files`` (glob patterns relative to ``output_dir``); returns the repo URL."""
    from huggingface_hub import upload_folder

    info = upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=commit_message or "Upload adjoint-matching LoRA adapter",
        allow_patterns=list(files),
        token=token,
    )
    return str(getattr(info, "repo_url", None) or f"https://huggingface.co/{repo_id}")


# -- the model card ------------------------------------------------------------------------------------------

TEMPLATE = Path(__file__).resolve().with_name("model_card_template.md")


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_model_card(
    *,
    base_model: str,
    method: str,
    truncate_steps: int,
    num_inference_steps: int,
    reg_order: float,
    reward: str,
    reward_scale: float,
    steps: int,
    reward_before: float | None,
    reward_after: float | None,
    final_metrics: dict[str, Any],
    grid: str,
    pipeline_class: str,
    pipeline_module: str,
    adapter_location: str,
    conditioning: str = "text",
    base_grid: str | None = None,
    base_quantization: str = "none",
    template_path: str | Path | None = None,
    **settings: Any,
):
    """A ``huggingface_hub.ModelCard`` for the run (nothing is downloaded: local template)."""
    from huggingface_hub import ModelCard, ModelCardData

    template_path = Path(template_path or TEMPLATE)
    if not template_path.is_file():
        raise UserError(f"model card template {str(template_path)!r} not found.")

    object_record = str(base_model).startswith("<")  # "<pipeline object: ...>": passed from Python, no id known
    shipped = next((name for name, folder in EMBEDDED_NAMES.items() if str(base_model).lower() == name
                    or (not object_record and Path(base_model).resolve() == folder.resolve())), None)
    hub_base = None if object_record or shipped or Path(base_model).exists() else base_model  # Hub ids only
    data = ModelCardData(
        library_name="diffusers",
        base_model=hub_base,
        tags=["diffusers", "lora", "adjoint-matching", method, "reward-fine-tuning"],
        license=settings.pop("license", None),
    )
    kind = "class labels" if conditioning == "class" else "prompts"
    embedded = Path(base_model).resolve() == EMBEDDED_DIGITS_BASE.resolve()
    known = METHODS.get(method)
    method_name = known.display_name if known is not None else method
    base_ref = "EMBEDDED_DIGITS_BASE" if embedded else json.dumps(str(base_model))
    base_import = "from diffusers_am.models import EMBEDDED_DIGITS_BASE" if embedded else None
    if shipped:  # a pipeline shipped in the package (shapes-klein): load it by its constant
        constant = "EMBEDDED_" + shipped.upper().replace("-", "_")
        base_ref, base_import = constant, f"from diffusers_am.models import {constant}"
    return ModelCard.from_template(
        data,
        template_path=str(template_path),
        title=f"{method_name[0].upper()}{method_name[1:]} LoRA for "
        f"{'the embedded digits base' if embedded else Path(base_model).name}",
        base_model="the embedded digits base (diffusers_am/assets/digits-sit)" if embedded else base_model,
        base_model_ref=base_ref,
        base_import=base_import,
        method=method,
        method_name=method_name,
        truncate_steps=truncate_steps,
        num_inference_steps=num_inference_steps,
        reg_order=_fmt(reg_order) if known and known.uses_reg_order else f"{_fmt(reg_order)} (unused by {method})",
        reward=reward,
        reward_scale=_fmt(reward_scale),
        steps=steps,
        reward_before=_fmt(reward_before),
        reward_after=_fmt(reward_after),
        final_metrics=", ".join(f"{k} = {_fmt(v)}" for k, v in final_metrics.items()) or "n/a",
        grid=grid,
        base_grid=base_grid,
        base_quantization=base_quantization,
        pipeline_class=pipeline_class,
        pipeline_module=pipeline_module,
        adapter_location=adapter_location,
        condition_kind=kind,
        condition_kind_singular=kind[:-1],
        **{k: _fmt(v) if not isinstance(v, bool) else v for k, v in settings.items()},
    )
