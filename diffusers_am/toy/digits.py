"""The scikit-learn digits testbed: data and the small CNN classifiers.

Data: the 1797 8x8 grayscale digits that ship inside scikit-learn (``load_digits``: no
download), split once into train / test by a seed (stratified by class).

Conventions:
  * classifier images: float [N, 1, 8, 8] in [0, 1] (white digit on black, pixel / 16);
  * flow data: the same images scaled to [-1, 1] (``to_flow_space``); a flow sample
    decodes back with ``x * 0.5 + 0.5``.

Classifiers (:class:`DigitsClassifier`) are saved as ``model.safetensors`` plus a
``config.json`` holding the constructor arguments (:meth:`save_pretrained` /
:meth:`from_pretrained`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..errors import UserError
from ..checks import one_of
from .serialization import ClassifierFolderMixin

NUM_CLASSES = 10
IMAGE_SIZE = 8


# -- data ---------------------------------------------------------------------------------
@dataclass
class DigitsSplit:
    """A fixed train / test split. Images [N, 1, 8, 8] float32 in [0, 1]; labels [N] int64."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: images [1797, 1, 8, 8] float32 in [0, 1], labels [1797] int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(data.target, dtype=torch.int64)
    return images, labels


def digits_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """Stratified train / test split of the digits, fixed by ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"`test_fraction` must be in (0, 1); got {test_fraction}.")
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_tensors()
    index = torch.arange(len(labels)).numpy()
    train_idx, test_idx = train_test_split(
        index, test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    return DigitsSplit(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


def to_flow_space(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> [-1, 1] flow data."""
    return images * 2.0 - 1.0


def from_flow_space(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] flow states -> [0, 1] images (clamped)."""
    return (x * 0.5 + 0.5).clamp(0.0, 1.0)


# -- classifiers --------------------------------------------------------------------------
_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU, "softplus": nn.Softplus}
_DOWNSAMPLE = ("avgpool", "stride")


@dataclass
class DigitsClassifierConfig:
    """Constructor arguments of :class:`DigitsClassifier` (what ``config.json`` stores).

    ``channels``: one conv stage per entry; every stage but the last halves the 8x8 grid
    (``downsample``: ``"avgpool"`` after the conv, or a stride-2 conv). ``feature_dim``: the
    width of the penultimate layer, the feature space returned by ``features``."""

    channels: list[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 3
    feature_dim: int = 64
    activation: str = "silu"
    downsample: str = "avgpool"
    num_classes: int = NUM_CLASSES

    def __post_init__(self) -> None:
        self.channels = [int(c) for c in self.channels]
        if not self.channels or any(c <= 0 for c in self.channels):
            raise UserError(f"`channels` must be a non-empty list of positive ints; got {self.channels}.")
        if len(self.channels) > 4:
            raise UserError(f"`channels` has {len(self.channels)} stages; an 8x8 input allows at most 4.")
        if self.kernel_size % 2 != 1 or self.kernel_size < 1:
            raise UserError(f"`kernel_size` must be an odd positive int; got {self.kernel_size}.")
        one_of(self.activation, "activation", sorted(_ACTIVATIONS))
        one_of(self.downsample, "downsample", _DOWNSAMPLE)
        if self.feature_dim <= 0 or self.num_classes < 2:
            raise UserError("`feature_dim` must be positive and `num_classes` at least 2.")


class DigitsClassifier(ClassifierFolderMixin, nn.Module):
    """Small CNN on 8x8 digits. Input [B, 1, 8, 8] in [0, 1]; ``forward`` -> logits
    [B, num_classes]; ``features`` -> penultimate activations [B, feature_dim].

    No batch norm or dropout: train and eval mode compute the same function."""

    config_class = DigitsClassifierConfig
    trained_by = "scripts/train_digits_classifiers.py"

    def __init__(self, config: DigitsClassifierConfig | None = None):
        super().__init__()
        self.config = config or DigitsClassifierConfig()
        cfg = self.config
        act = _ACTIVATIONS[cfg.activation]
        layers: list[nn.Module] = []
        in_ch, size = 1, IMAGE_SIZE
        for i, out_ch in enumerate(cfg.channels):
            last = i == len(cfg.channels) - 1
            stride = 2 if (cfg.downsample == "stride" and not last) else 1
            layers += [nn.Conv2d(in_ch, out_ch, cfg.kernel_size, stride=stride, padding=cfg.kernel_size // 2), act()]
            if cfg.downsample == "avgpool" and not last:
                layers.append(nn.AvgPool2d(2))
            if not last:
                size //= 2
            in_ch = out_ch
        self.trunk = nn.Sequential(*layers)
        self.neck = nn.Sequential(nn.Flatten(), nn.Linear(in_ch * size * size, cfg.feature_dim), act())
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, 8, 8] in [0, 1] -> penultimate features [B, feature_dim]."""
        return self.neck(self.trunk(images * 2.0 - 1.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1, 8, 8] in [0, 1] -> logits [B, num_classes]."""
        return self.head(self.features(images))


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (images [N, 1, 8, 8] in [0, 1] -> logits) on labels [N]."""
    if len(images) != len(labels) or len(labels) == 0:
        raise UserError(f"`images` ({len(images)}) and `labels` ({len(labels)}) must be non-empty and equal in length.")
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(labels)


def as_class_labels(prompts: Sequence, num_classes: int = NUM_CLASSES, name: str = "prompts") -> torch.Tensor:
    """Class labels from a list of ints (or digit strings like ``"3"``, or 0-dim tensors) -> [B] int64.

    Raises ValueError for a non-integer entry or one outside [0, num_classes)."""
    labels = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor) and p.dim() == 0 and not p.is_floating_point():
            p = int(p)
        elif isinstance(p, str) and p.strip().lstrip("-").isdigit():
            p = int(p.strip())
        elif hasattr(p, "__index__") and not isinstance(p, bool):
            p = int(p.__index__())
        else:
            raise UserError(f"`{name}`[{i}] = {p!r} is not a class label; pass integers in [0, {num_classes}).")
        if not 0 <= p < num_classes:
            raise UserError(f"`{name}`[{i}] = {p} is out of range; class labels must be in [0, {num_classes}).")
        labels.append(p)
    return torch.tensor(labels, dtype=torch.int64)
