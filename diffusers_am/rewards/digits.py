"""Digits rewards: the log-probability of the conditioning class under a small CNN.

``reward(images, prompts) = log p(prompts[i] | images[i])`` under a classifier trained on the
scikit-learn digits (``scripts/train_digits_classifiers.py``), so rewards are <= 0 and 0 means
a certain classification. Two classifiers ship with the package:

* ``"digits"`` (:func:`load_digits_reward`): the reward used for fine-tuning; its penultimate
  features (:meth:`DigitsReward.features`) are the feature space for diversity and
  Recall / Coverage on the digits testbed;
* ``"digits-heldout"`` (:func:`load_digits_heldout_reward`): an independently trained
  classifier (other seed, data order and architecture) that fine-tuning never sees; a gap
  between the two rewards after fine-tuning signals reward hacking;
* ``"digits-heldout-accuracy"`` (:func:`load_digits_heldout_accuracy`): for evaluation only, 1 where
  the held-out classifier's most likely class is the label (its mean is the held-out accuracy).

Images: [B, 1, H, W] or [B, 3, H, W] floats in [0, 1]. RGB is converted to grey (ITU-R
BT.601 luma); any H, W != 8 is resized to 8x8 by differentiable (antialiased) bilinear
interpolation. Prompts: B class labels (ints, or digit strings such as ``"3"``) in [0, 10).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..toy.digits import IMAGE_SIZE, DigitsClassifier, as_class_labels
from .base import check_images

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DIGITS_CLASSIFIER = ASSETS / "digits-classifier"
DIGITS_HELDOUT_CLASSIFIER = ASSETS / "digits-heldout-classifier"

_LUMA = (0.299, 0.587, 0.114)


class DigitsReward(nn.Module):
    """Frozen digits classifier as a reward: (images [B, C, H, W] in [0, 1], labels) -> [B] fp32
    log-probabilities of the labels. Differentiable w.r.t. the images; parameters frozen."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DigitsReward":
        """Stays in eval mode: a reward is frozen even inside a module put in train mode."""
        return super().train(False)

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1 or 3, H, W] in [0, 1] -> [B, 1, 8, 8] in the classifier's dtype (differentiable)."""
        check_images(images)
        param = next(self.classifier.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        if x.shape[1] == 3:
            luma = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x * luma).sum(dim=1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            shrink = x.shape[-2] > IMAGE_SIZE or x.shape[-1] > IMAGE_SIZE
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate classifier features [B, F] (fp32) of images [B, C, H, W] in [0, 1]."""
        return self.classifier.features(self.preprocess(images)).float()

    def log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Class log-probabilities [B, 10] (fp32) of images [B, C, H, W] in [0, 1]."""
        return torch.log_softmax(self.classifier(self.preprocess(images)).float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        """log p(prompts[i] | images[i]) for each sample: [B] fp32, <= 0."""
        if len(prompts) != images.shape[0]:
            raise UserError(
                f"`prompts` has {len(prompts)} class labels but `images` has batch size {images.shape[0]}; "
                "pass one label per image."
            )
        labels = as_class_labels(prompts, self.num_classes).to(images.device)
        return self.log_probs(images).gather(1, labels[:, None]).squeeze(1)


def _load(path: str | Path | None, default: Path, name: str, device, dtype) -> DigitsReward:
    folder = Path(path) if path is not None else default
    if not folder.is_dir():
        raise UserError(
            f"reward {name!r}: classifier folder {str(folder)!r} does not exist. It must hold model.safetensors "
            f"and config.json as written by `python scripts/train_digits_classifiers.py` (shipped default: "
            f"{str(default)!r})."
        )
    reward = DigitsReward(DigitsClassifier.from_pretrained(folder))
    return reward.to(device=device or "cpu", dtype=dtype or torch.float32)


def load_digits_reward(
    path: str | Path | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitsReward:
    """The ``"digits"`` reward: log p(class | image) under the shipped reward classifier
    (``path``: a folder with model.safetensors + config.json; default the shipped asset)."""
    return _load(path, DIGITS_CLASSIFIER, "digits", device, dtype)


def load_digits_heldout_reward(
    path: str | Path | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> DigitsReward:
    """The ``"digits-heldout"`` reward: log p(class | image) under the independently trained
    held-out classifier, for evaluation only (never train on it)."""
    return _load(path, DIGITS_HELDOUT_CLASSIFIER, "digits-heldout", device, dtype)


def load_digits_heldout_accuracy(
    path: str | Path | None = None, device: torch.device | str | None = None, dtype: torch.dtype | None = None
):
    """The ``"digits-heldout-accuracy"`` metric (evaluation only, not differentiable): ``(images, labels) ->
    [B]``, 1.0 where the held-out classifier's most likely class is the label, else 0.0; averaged by
    ``python -m diffusers_am.evaluate --rewards digits-heldout-accuracy`` into the held-out accuracy."""
    classifier = load_digits_heldout_reward(path, device=device, dtype=dtype)

    def digits_heldout_accuracy(images: torch.Tensor, prompts: Sequence[Any]) -> torch.Tensor:
        labels = as_class_labels(prompts, classifier.num_classes).to(images.device)
        return (classifier.log_probs(images).argmax(dim=-1) == labels).float()

    return digits_heldout_accuracy


__all__ = [
    "DIGITS_CLASSIFIER",
    "DIGITS_HELDOUT_CLASSIFIER",
    "DigitsReward",
    "load_digits_heldout_accuracy",
    "load_digits_heldout_reward",
    "load_digits_reward",
]
