"""The trainer's validation: the grid of the validation prompts and its held-out metrics, and the
before / after reward. Sampling (:mod:`diffusers_am.sampling`), the grid (:mod:`diffusers_am.metrics.grid`),
diversity (:mod:`diffusers_am.metrics.diversity`) and reward scoring (:mod:`diffusers_am.rewards.scoring`)
are the same functions ``python -m diffusers_am.evaluate`` uses. The grids also go to the run's trackers
(accelerate's ``GeneralTracker.log_images``: :func:`log_grid`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from ..metrics.grid import comparison_grid, save_grid
from ..models.base import FlowModelAdapter
from ..prompts import derive_seed
from ..rewards import load_reward
from ..rewards.scoring import score_rewards
from ..sampling import sample_images
from .config import TrainingConfig
from .layout import COMPARISON_NAME, VALIDATION_DIR, VALIDATION_LOG_NAME
from .logs import JsonlLog

if TYPE_CHECKING:
    from .context import RunContext


@torch.no_grad()
def mean_reward(
    reward: Callable, images: torch.Tensor, conditions: Sequence[Any], chunk_size: int = 32
) -> torch.Tensor:
    """Rewards [B] of images [B, C, H, W] (fp32, on CPU): the weighted sum of :func:`score_rewards`."""
    return score_rewards(reward, images, conditions, batch_size=chunk_size)["reward"]


def eval_set(
    model: FlowModelAdapter, prompts: Sequence[Any], resolution: int, num_samples: int, seed: int
) -> tuple[list, torch.Tensor]:
    """Fixed conditions (cycling through the unique prompts) and noise for the before / after reward."""
    n = max(1, num_samples)
    unique = list(dict.fromkeys(prompts))
    conditions = [unique[i % len(unique)] for i in range(n)]
    gen = torch.Generator(device=model.device).manual_seed(derive_seed(seed, "eval"))
    return conditions, model.initial_noise(n, resolution, gen)


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
        self.reward = self.features = self.base_images = self.latest_images = None
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
        with torch.no_grad():  # "auto" / "none" / names: the rule of metrics.diversity.resolve_diversity
            metrics = validation_metrics(
                images, conditions, base_images=None if base else self.base_images,
                held_out_reward=self.reward, features=self.features, diversity=cfg.validation_diversity,
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
    cfg, metrics = ctx.config, ctx.validation
    per = cfg.num_validation_images
    conditions, images = validation_images(ctx, base)
    if base:
        metrics.base_images = images
    else:
        metrics.latest_images = images
    if metrics.enabled:
        metrics.log(ctx, images, conditions, base, step)
    path = ctx.output_dir / name
    if write:  # written beside and moved into place: a kill while writing leaves no partial grid
        title = "base model" if base else f"fine-tuned, update {step}" if step is not None else "fine-tuned"
        tmp = path.with_name(f".tmp-{path.name}")
        save_grid(images, per, tmp, row_labels=ctx.val_prompts, title=title)
        os.replace(tmp, path)
        if ctx.accelerator.trackers:  # one image series: the base grid at step 0, then each update's
            log_grid(ctx.accelerator, "validation/grid", path, step=0 if base else int(step or 0))
    return path


def validation_images(ctx: RunContext, base: bool) -> tuple[list, torch.Tensor]:
    """(conditions, images [B, C, H, W] in [0, 1]) of the validation grid: each validation prompt
    ``num_validation_images`` times, on the run's fixed validation noise; of the base model or the current one."""
    cfg, model = ctx.config, ctx.adapter
    conditions = [p for p in ctx.val_prompts for _ in range(cfg.num_validation_images)]
    gen = torch.Generator(device=model.device).manual_seed(derive_seed(cfg.seed, "validation"))
    noise = model.initial_noise(len(conditions), ctx.resolution, gen)
    _, images = sample_images(model, conditions, noise, ctx.times, guidance_scale=cfg.guidance_scale, base=base)
    return conditions, images


def write_comparison(ctx: RunContext, step: int) -> Path:
    """``comparison.png``: the base model's validation grid beside the fine-tuned one (same noise, same
    prompts), rows labelled, from the images of ``validation/base.png`` and the last validation grid. The base
    is sampled again only when this process has not sampled it (a resumed run's set-up does not)."""
    metrics = ctx.validation
    if metrics.latest_images is None:
        raise RuntimeError("write_comparison needs a fine-tuned validation grid first (validation_grid).")
    base = metrics.base_images if metrics.base_images is not None else validation_images(ctx, base=True)[1]
    image = comparison_grid(
        {"base model": base, f"fine-tuned, update {step}": metrics.latest_images},
        ctx.config.num_validation_images, row_labels=ctx.val_prompts,
    )
    path = ctx.output_dir / COMPARISON_NAME
    tmp = ctx.output_dir / VALIDATION_DIR / f".tmp-{path.name}"  # in the run's own folder: never a partial file
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


# -- grids to the trackers -----------------------------------------------------------------------------------

def grid_pixels(path: str | Path) -> np.ndarray:
    """The PNG at ``path`` as [H, W, 3] uint8 RGB (a grayscale grid is repeated over the channels)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def log_grid(accelerator: Any, tag: str, path: str | Path, step: int) -> list[str]:
    """Log the grid image at ``path`` under ``tag`` at ``step`` to every tracker that takes images
    (tensorboard: ``add_images``; wandb: ``wandb.Image``); returns the names of the trackers that got it."""
    done = []
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: grid_pixels(path)[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({tag: [grid_pixels(path)]}, step=step)
        else:
            continue
        done.append(tracker.name)
    return done
