"""Train the two digits classifiers shipped with the package.

* ``diffusers_am/assets/digits-classifier/``: the reward classifier (reward ``"digits"``;
  its penultimate features are the feature space for diversity and Recall / Coverage);
* ``diffusers_am/assets/digits-heldout-classifier/``: an independently trained held-out
  classifier (reward ``"digits-heldout"``), never used for training: the reward-hacking check.

The two differ in seed, data order and architecture (kernel size, width, activation,
downsampling). Both see light augmentation (random affine jitter, blur, contrast, pixel
noise) so that they generalize to generated samples. Usage (about a minute on one core):

    python scripts/train_digits_classifiers.py
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_am.checks import positive_float, positive_int
from diffusers_am.toy.digits import DigitsClassifier, DigitsClassifierConfig, classifier_accuracy, digits_split

ASSETS = Path(__file__).resolve().parent.parent / "diffusers_am" / "assets"

CLASSIFIERS = {
    "digits-classifier": dict(
        config=DigitsClassifierConfig(channels=[32, 64], kernel_size=3, feature_dim=64, activation="silu", downsample="avgpool"),
        seed=1,
    ),
    "digits-heldout-classifier": dict(
        config=DigitsClassifierConfig(channels=[24, 48, 96], kernel_size=5, feature_dim=48, activation="gelu", downsample="stride"),
        seed=2,
    ),
}


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light augmentation of [B, 1, 8, 8] images in [0, 1]: rotation (+-12 deg), scale
    (0.9-1.1), shift (+-1 px), occasional blur, contrast (0.7-1.1), Gaussian pixel noise."""
    b = images.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    angle = uniform(-12, 12) * math.pi / 180
    scale = uniform(0.9, 1.1)
    shift = uniform(-0.25, 0.25), uniform(-0.25, 0.25)  # 1 px = 2 / 8 in grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]).div(16).view(1, 1, 3, 3)
    blurred = F.conv2d(out, blur, padding=1)
    use_blur = (torch.rand(b, generator=generator) < 0.2).view(b, 1, 1, 1)
    out = torch.where(use_blur, blurred, out)
    out = out * uniform(0.7, 1.1).view(b, 1, 1, 1)
    noise_level = uniform(0.0, 0.08).view(b, 1, 1, 1)
    out = out + noise_level * torch.randn(out.shape, generator=generator)
    return out.clamp(0.0, 1.0)


def train_classifier(
    config: DigitsClassifierConfig,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    label_smoothing: float,
    split_seed: int,
) -> tuple[DigitsClassifier, dict]:
    """Train one classifier on the train split; returns it (eval mode) and its training record."""
    split = digits_split(seed=split_seed)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsClassifier(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n = len(split.train_labels)
    steps = epochs * math.ceil(n / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            x = augment(split.train_images[idx], generator)
            loss = F.cross_entropy(model(x), split.train_labels[idx], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    record = {
        "seed": seed,
        "split_seed": split_seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "label_smoothing": label_smoothing,
        "train_accuracy": round(classifier_accuracy(model, split.train_images, split.train_labels), 4),
        "test_accuracy": round(classifier_accuracy(model, split.test_images, split.test_labels), 4),
        "test_size": len(split.test_labels),
        "train_seconds": round(time.perf_counter() - start, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, record


def write_card(folder: Path, name: str, config: DigitsClassifierConfig, record: dict) -> None:
    role = (
        "the reward classifier (reward `digits` = log p(class | image); its penultimate features are the "
        "feature space for diversity and Recall / Coverage on the digits testbed)"
        if name == "digits-classifier"
        else "the held-out classifier (reward `digits-heldout`), trained independently and never used for "
        "fine-tuning: the reward-hacking check"
    )
    text = f"""# {name}

A small CNN on the scikit-learn 8x8 digits, {role}.

- Input: [B, 1, 8, 8] in [0, 1] (pixel / 16, white digit on black); output: 10 logits.
- Architecture: conv stages {config.channels}, kernel {config.kernel_size}, {config.activation},
  downsampling by {config.downsample}, penultimate width {config.feature_dim};
  {record['num_parameters']} parameters.
- Data: stratified 80/20 split of `sklearn.datasets.load_digits` (split seed {record['split_seed']}),
  light augmentation (affine jitter, blur, contrast, pixel noise), label smoothing {record['label_smoothing']}.
- Training: seed {record['seed']}, {record['epochs']} epochs, batch {record['batch_size']}, AdamW one-cycle lr {record['lr']}.
- Test accuracy: **{record['test_accuracy']:.4f}** on {record['test_size']} held-out digits
  (train {record['train_accuracy']:.4f}).

Reproduce: `python scripts/train_digits_classifiers.py`.
Load: `diffusers_am.toy.digits.DigitsClassifier.from_pretrained(folder)` or
`diffusers_am.rewards.load_reward("{'digits' if name == 'digits-classifier' else 'digits-heldout'}")`.
"""
    (folder / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=ASSETS, help="folder receiving one sub-folder per classifier")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--label_smoothing", type=float, default=0.05)
    parser.add_argument("--split_seed", type=int, default=0, help="seed of the train/test split (shared with the base model)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    try:
        positive_int(args.epochs, "--epochs")
        positive_int(args.batch_size, "--batch_size")
        positive_float(args.lr, "--lr")
    except ValueError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    for name, spec in CLASSIFIERS.items():
        model, record = train_classifier(
            spec["config"], spec["seed"], args.epochs, args.batch_size, args.lr, args.label_smoothing, args.split_seed
        )
        folder = args.output_dir / name
        model.save_pretrained(folder, extra_config=record)
        write_card(folder, name, spec["config"], record)
        print(f"{name}: test accuracy {record['test_accuracy']:.4f} ({record['train_seconds']} s) -> {folder}")


if __name__ == "__main__":
    main()
