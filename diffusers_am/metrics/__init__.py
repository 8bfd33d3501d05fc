"""Evaluation metrics: within-prompt diversity (LPIPS, 1 - MS-SSIM, 1 - SSIM, feature distance),
mode coverage (Recall / Coverage, k = 5) against the base model, pluggable feature extractors,
and :func:`validation_metrics`, the one call a training loop makes at validation time."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from .coverage import DEFAULT_K, knn_radii, prdc, recall_coverage
from .diversity import (
    DIVERSITY_METRICS,
    FeatureDistance,
    default_diversity_metrics,
    get_diversity_metric,
    group_indices,
    one_minus_ms_ssim,
    one_minus_ssim,
    resolve_diversity,
    within_prompt_diversity,
)
from .features import ClipImageFeatures, extract_features, load_feature_extractor


@torch.no_grad()
def validation_metrics(
    images: torch.Tensor,
    conditions: Sequence[Any],
    *,
    base_images: torch.Tensor | None = None,
    held_out_reward: Callable[[torch.Tensor, Sequence[Any]], torch.Tensor] | None = None,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    diversity: str | Sequence[str] | Mapping[str, Callable] | None = "auto",
    k: int = DEFAULT_K,
) -> dict[str, float]:
    """Scalars to log beside the training reward.

    Args:
        images: [N, C, H, W] in [0, 1], the fine-tuned model's samples.
        conditions: N prompts or class labels (repeated entries form the diversity groups).
        base_images: [M, C, H, W] base-model samples; with ``features``, adds recall / coverage.
        held_out_reward: a reward never trained on; adds ``heldout_reward`` (its mean).
        features: images -> [B, F]; used for recall / coverage and the feature distance.
        diversity: see :func:`resolve_diversity`.
    Returns keys ``heldout_reward``, ``diversity/<name>``, ``recall``, ``coverage`` (those that apply).
    """
    out: dict[str, float] = {}
    if held_out_reward is not None:
        from ..rewards.scoring import score_rewards

        scores = score_rewards(held_out_reward, images, list(conditions), batch_size=max(1, images.shape[0]))
        out["heldout_reward"] = scores["reward"].mean().item()
    for name, metric in resolve_diversity(diversity, min(images.shape[-2:]), features).items():
        out[f"diversity/{name}"] = within_prompt_diversity(images, conditions, metric)
    if base_images is not None and features is not None:
        out.update(recall_coverage(extract_features(features, base_images), extract_features(features, images), k=k))
    return out


__all__ = [
    "DEFAULT_K",
    "DIVERSITY_METRICS",
    "ClipImageFeatures",
    "FeatureDistance",
    "default_diversity_metrics",
    "extract_features",
    "get_diversity_metric",
    "group_indices",
    "knn_radii",
    "load_feature_extractor",
    "one_minus_ms_ssim",
    "one_minus_ssim",
    "prdc",
    "recall_coverage",
    "resolve_diversity",
    "validation_metrics",
    "within_prompt_diversity",
]
