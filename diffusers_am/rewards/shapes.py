"""Shapes rewards (the ``shapes-klein`` miniature's testbed, :mod:`diffusers_am.toy.shapes`).

* ``"shapes"`` (:func:`load_shapes_reward`): the fine-tuning reward, differentiable:
  ``sum over the caption's 4 attributes of log p(attribute | image)`` under a small CNN with four
  heads (left colour, left shape, right colour, right shape), so rewards are <= 0, 0 = certain.
  Its penultimate features (:meth:`ShapesReward.features`) are the feature space for diversity
  and Recall / Coverage.
* ``"shapes-heldout"`` (:func:`load_shapes_heldout_reward`): the same quantity under an
  independently trained classifier (other seed, data order, architecture), never trained on.
* ``"shapes-gold"`` (:func:`load_shapes_gold_reward`): the non-learned judge, 1.0 where the image
  is an exact match of its caption by colour segmentation and shape / position measurement on
  the pixels (:func:`diffusers_am.toy.shapes.gold_check`), else 0.0. Not differentiable: an
  evaluation and validation reward, refused for training.

Classifiers are trained by ``scripts/train_shapes_classifiers.py`` on the training compositions
only, saved as ``model.safetensors`` + ``config.json``. Images: [B, 3, H, W] in [0, 1]; any
size other than 32x32 is resized (differentiable bilinear). Prompts: shapes captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..checks import one_of
from ..toy.serialization import CONFIG_NAME, WEIGHTS_NAME, ClassifierFolderMixin
from ..toy.shapes import COLOURS, RESOLUTION, SHAPES, gold_check, parse_caption
from .base import check_images

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHAPES_CLASSIFIER = ASSETS / "shapes-classifier"
SHAPES_HELDOUT_CLASSIFIER = ASSETS / "shapes-heldout-classifier"
HEADS = (len(COLOURS), len(SHAPES), len(COLOURS), len(SHAPES))
"""Classes of the four heads: left colour, left shape, right colour, right shape."""
_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


@dataclass
class ShapesClassifierConfig:
    """Constructor arguments of :class:`ShapesClassifier`: one stride-2 conv stage per ``channels``
    entry (each halves the 32x32 grid), then a linear layer of ``feature_dim``."""

    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    kernel_size: int = 3
    feature_dim: int = 64
    activation: str = "silu"

    def __post_init__(self) -> None:
        self.channels = [int(c) for c in self.channels]
        if not 1 <= len(self.channels) <= 4 or any(c <= 0 for c in self.channels):
            raise UserError(f"`channels` must list 1 to 4 positive ints; got {self.channels}.")
        if self.kernel_size % 2 != 1:
            raise UserError(f"`kernel_size` must be odd; got {self.kernel_size}.")
        one_of(self.activation, "activation", sorted(_ACTIVATIONS))


class ShapesClassifier(ClassifierFolderMixin, nn.Module):
    """CNN on [B, 3, 32, 32] in [0, 1] -> logits of the four heads, concatenated [B, 14]."""

    config_class = ShapesClassifierConfig
    trained_by = "scripts/train_shapes_classifiers.py"

    def __init__(self, config: ShapesClassifierConfig | None = None):
        super().__init__()
        self.config = config or ShapesClassifierConfig()
        cfg = self.config
        act = _ACTIVATIONS[cfg.activation]
        layers: list[nn.Module] = []
        in_ch, size = 3, RESOLUTION
        for out_ch in cfg.channels:
            layers += [nn.Conv2d(in_ch, out_ch, cfg.kernel_size, stride=2, padding=cfg.kernel_size // 2), act()]
            in_ch, size = out_ch, size // 2
        self.trunk = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(in_ch * size * size, cfg.feature_dim), act())
        self.head = nn.Linear(cfg.feature_dim, sum(HEADS))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.trunk(images * 2.0 - 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def head_log_probs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-head log-probabilities, a list of 4 tensors [B, classes] (fp32)."""
        logits = self(images).float()
        return [torch.log_softmax(part, dim=-1) for part in logits.split(list(HEADS), dim=-1)]


def captions_to_targets(prompts: Sequence[str]) -> torch.Tensor:
    """[B, 4] int64 attribute indices of shapes captions (ValueError naming a bad one)."""
    return torch.tensor([parse_caption(p) for p in prompts], dtype=torch.int64).view(-1, 4)


class ShapesReward(nn.Module):
    """Frozen classifier as a reward: (images [B, 3, H, W] in [0, 1], captions) -> [B] fp32
    ``sum_h log p_h(attribute_h | image)``; differentiable in the images."""

    def __init__(self, classifier: ShapesClassifier):
        super().__init__()
        self.classifier = classifier.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ShapesReward":
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        if images.shape[1] != 3:
            raise UserError(f"shapes rewards take RGB images [B, 3, H, W]; got {images.shape[1]} channels.")
        param = next(self.classifier.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        if x.shape[-2:] != (RESOLUTION, RESOLUTION):
            shrink = x.shape[-1] > RESOLUTION
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features [B, feature_dim] (fp32)."""
        return self.classifier.features(self.preprocess(images)).float()

    def attribute_log_probs(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[B, 4] log p of each caption attribute (left colour, left shape, right colour, right shape)."""
        if len(prompts) != images.shape[0]:
            raise UserError(f"`prompts` has {len(prompts)} captions but `images` has batch size {images.shape[0]}.")
        targets = captions_to_targets(prompts).to(images.device)
        heads = self.classifier.head_log_probs(self.preprocess(images))
        return torch.stack([h.gather(1, targets[:, i : i + 1]).squeeze(1) for i, h in enumerate(heads)], dim=1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.attribute_log_probs(images, prompts).sum(dim=1)


class ShapesGoldReward(nn.Module):
    """The gold checker as a (non-differentiable) reward: [B] fp32, 1.0 for an exact match."""

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images)
        return gold_check(images.detach(), list(prompts)).float().to(images.device)


def _load(path, default: Path, name: str, device, dtype) -> ShapesReward:
    folder = Path(path) if path is not None else default
    if not folder.is_dir():
        raise UserError(
            f"reward {name!r}: classifier folder {str(folder)!r} does not exist; it must hold {WEIGHTS_NAME} and "
            f"{CONFIG_NAME} as written by `python scripts/train_shapes_classifiers.py` (shipped: {str(default)!r})."
        )
    return ShapesReward(ShapesClassifier.from_pretrained(folder)).to(device=device or "cpu", dtype=dtype or torch.float32)


def load_shapes_reward(path=None, device=None, dtype=None) -> ShapesReward:
    """The ``"shapes"`` fine-tuning reward (``path``: a classifier folder; default the shipped one)."""
    return _load(path, SHAPES_CLASSIFIER, "shapes", device, dtype)


def load_shapes_heldout_reward(path=None, device=None, dtype=None) -> ShapesReward:
    """The ``"shapes-heldout"`` reward: the independently trained classifier, for evaluation only."""
    return _load(path, SHAPES_HELDOUT_CLASSIFIER, "shapes-heldout", device, dtype)


def load_shapes_gold_reward(path=None, device=None, dtype=None) -> ShapesGoldReward:
    """The ``"shapes-gold"`` judge (no checkpoint: ``path`` must be None)."""
    if path is not None:
        raise UserError("reward 'shapes-gold' is a pixel checker with no checkpoint; drop its --reward_model_paths entry.")
    return ShapesGoldReward()


__all__ = [
    "HEADS",
    "SHAPES_CLASSIFIER",
    "SHAPES_HELDOUT_CLASSIFIER",
    "ShapesClassifier",
    "ShapesClassifierConfig",
    "ShapesGoldReward",
    "ShapesReward",
    "captions_to_targets",
    "load_shapes_gold_reward",
    "load_shapes_heldout_reward",
    "load_shapes_reward",
]
