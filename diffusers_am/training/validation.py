"""Sampling for validation grids and the before / after reward, through the adapter interface only,
and the trainer's validation: the grid of the validation prompts and its held-out metrics."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from ..flow import sample_euler
from ..models.base import FlowModelAdapter
from ..rewards import check_reward_output, load_reward
from .config import TrainingConfig
from .data import derive_seed
from .logs import JsonlLog

if TYPE_CHECKING:
    from .context import RunContext

VALIDATION_LOG_NAME = "validation_log.jsonl"


@torch.no_grad()
def sample_images(
    adapter: FlowModelAdapter,
    conditions: Sequence[Any],
    noise: torch.Tensor,
    times: torch.Tensor,
    *,
    guidance_scale: float | None = None,
    base: bool = False,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler-sample ``noise`` [B, ...] along ``times`` [N+1] and decode.

    ``base=True`` runs the base model (LoRA disabled). Returns (terminal states [B, ...], images
    [B, C, H, W] in [0, 1]), both fp32 on the adapter's device."""
    if len(conditions) != noise.shape[0]:
        raise ValueError(
            f"`conditions` ({len(conditions)}) and `noise` ({noise.shape[0]}) must have the same batch size."
        )
    states, images = [], []
    ctx = adapter.adapters_disabled() if base else contextlib.nullcontext()
    with ctx:
        for start in range(0, len(conditions), chunk_size):
            chunk = list(conditions[start : start + chunk_size])
            flow = adapter.flow(adapter.encode_conditions(chunk), guidance_scale=guidance_scale)
            x = sample_euler(flow.velocity, noise[start : start + chunk_size], times)[-1]
            states.append(x)
            images.append(adapter.decode(x).float().clamp(0, 1))
    return torch.cat(states), torch.cat(images)


@torch.no_grad()
def mean_reward(
    reward: Callable, images: torch.Tensor, conditions: Sequence[Any], chunk_size: int = 32
) -> torch.Tensor:
    """Rewards [B] of images [B, C, H, W] (fp32, on CPU)."""
    out = []
    for i in range(0, len(conditions), chunk_size):
        chunk = images[i : i + chunk_size]
        value = check_reward_output(reward(chunk, list(conditions[i : i + chunk_size])), chunk.shape[0], "reward")
        out.append(value.float().cpu())
    return torch.cat(out)


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2):
    """A PIL image tiling ``images`` [B, C, H, W] in [0, 1] row-major, ``nrow`` images per row."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"`images` must be [B, C, H, W] with C in (1, 3); got {tuple(images.shape)}.")
    b, c, h, w = images.shape
    cols = max(1, min(nrow, b))
    rows = (b + cols - 1) // cols
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8) * 255
    pixels = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    for i in range(b):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        canvas[y : y + h, x : x + w] = pixels[i]
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if max(image.size) < 256:  # tiny images (digits are 8x8): upscale (nearest) so the grid is legible
        scale = 512 // max(image.size)
        image = image.resize((image.size[0] * scale, image.size[1] * scale), Image.NEAREST)
    return image


def save_grid(images: torch.Tensor, nrow: int, path: str | Path) -> Path:
    """Write ``image_grid(images, nrow)`` as PNG to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, nrow).save(path)
    return path


def eval_set(
    adapter: FlowModelAdapter, prompts: Sequence[Any], resolution: int, num_samples: int, seed: int
) -> tuple[list, torch.Tensor]:
    """Fixed conditions (cycling through the unique prompts) and noise for the before / after reward."""
    n = max(1, num_samples)
    unique = list(dict.fromkeys(prompts))
    conditions = [unique[i % len(unique)] for i in range(n)]
    gen = torch.Generator(device=adapter.device).manual_seed(derive_seed(seed, "eval"))
    return conditions, adapter.initial_noise(n, resolution, gen)


def eval_reward(ctx: RunContext, base: bool) -> float:
    """Mean training reward on ``ctx.eval_set``: of the base model, or of the fine-tuned one."""
    conditions, noise = ctx.eval_set
    _, images = sample_images(
        ctx.adapter, conditions, noise, ctx.times, guidance_scale=ctx.config.guidance_scale, base=base
    )
    return float(mean_reward(ctx.reward, images, conditions).mean())


class ValidationMetrics:
    """The held-out reward and feature extractor of ``--validation_reward`` / ``--validation_features``
    (loaded on the main process only; none when both are off) and the base grid's images."""

    def __init__(self, config: TrainingConfig, accelerator: Any):
        from ..metrics import load_feature_extractor

        self.config = config
        self.reward = self.features = self.base_images = None
        if not accelerator.is_main_process:
            return
        if config.validation_reward:
            self.reward = load_reward(config.validation_reward, device=accelerator.device, paths=config.reward_paths())
            if isinstance(self.reward, torch.nn.Module):
                self.reward.eval().requires_grad_(False)
        if config.validation_features:
            self.features = load_feature_extractor(config.validation_features, device=accelerator.device)

    @property
    def enabled(self) -> bool:
        """Whether a held-out reward or features are configured (and loaded here)."""
        return self.reward is not None or self.features is not None

    def log(self, ctx: RunContext, images: torch.Tensor, conditions: list, base: bool, step: int | None) -> None:
        """Held-out reward, diversity and (against the base grid) Recall / Coverage, logged to the
        tracker and appended to ``validation_log.jsonl``."""
        from ..metrics import validation_metrics

        cfg = self.config
        diversity = None if cfg.validation_diversity == "none" else (
            cfg.validation_diversity if cfg.validation_diversity == "auto" else cfg.validation_diversity.split(","))
        with torch.no_grad():
            metrics = validation_metrics(
                images, conditions, base_images=None if base else self.base_images,
                held_out_reward=self.reward, features=self.features, diversity=diversity,
            )
        record = {"step": 0 if base else step, "model": "base" if base else "fine-tuned", **metrics}
        JsonlLog(ctx.output_dir / VALIDATION_LOG_NAME).append(record)
        if not base and step is not None:
            ctx.accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)


def validation_grid(
    ctx: RunContext, name: str, *, base: bool = False, step: int | None = None, write: bool = True
) -> Path:
    """Grid of the validation prompts (rows) x ``num_validation_images`` (columns), fixed noise, at
    ``output_dir / name``.

    The base grid is kept for Recall / Coverage; every other grid is scored with
    ``validation_metrics`` when a held-out reward or features are configured."""
    cfg, adapter, metrics = ctx.config, ctx.adapter, ctx.validation
    per = cfg.num_validation_images
    conditions = [p for p in ctx.val_prompts for _ in range(per)]
    gen = torch.Generator(device=adapter.device).manual_seed(derive_seed(cfg.seed, "validation"))
    noise = adapter.initial_noise(len(conditions), ctx.resolution, gen)
    _, images = sample_images(adapter, conditions, noise, ctx.times, guidance_scale=cfg.guidance_scale, base=base)
    if base:
        metrics.base_images = images
    if metrics.enabled:
        metrics.log(ctx, images, conditions, base, step)
    path = ctx.output_dir / name
    return save_grid(images, per, path) if write else path
