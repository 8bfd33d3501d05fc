"""Train the embedded default base: a tiny class-conditional SiT flow on the 8x8 digits.

Pixel space (sample_size 8, 1 channel, patch 2: 16 tokens), 10 classes plus the null class
10 for classifier-free guidance (labels dropped with probability ``--label_dropout``). The
rectified-flow objective in paper time: ``x_t = t x_data + (1 - t) noise`` with t ~ U[0, 1],
regress the velocity ``x_data - noise`` (mean squared error); EMA weights are saved.

The result is a ``SiTPipeline`` folder (``save_pretrained``) at
``diffusers_am/assets/digits-sit`` (= ``diffusers_am.models.EMBEDDED_DIGITS_BASE``), with the
sampling defaults in ``diffusers_am_defaults.json``. The script then reloads the folder with
``SiTPipeline.from_pretrained``, samples ``--eval_per_class`` digits per class, and measures
the accuracy of the held-out and reward classifiers on them (conditioning class = label) at
guidance 1.0 and the default guidance; the numbers go into the folder's README.md.

    python scripts/train_digits_base.py                 # train + save + measure (~5-8 min on one core)
    python scripts/train_digits_base.py --eval_only     # re-measure the saved folder
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusers_am.checks import positive_int
from diffusers_am.jsonio import write_json
from diffusers_am.models import EMBEDDED_DIGITS_BASE
from diffusers_am.pipelines.sit_transformer import SiTTransformer2DModel
from diffusers_am.toy.digits import NUM_CLASSES, digits_split, to_flow_space

DEFAULTS_NAME = "diffusers_am_defaults.json"


def build_model(args: argparse.Namespace) -> SiTTransformer2DModel:
    return SiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        num_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        attention_head_dim=args.attention_head_dim,
        num_classes=NUM_CLASSES,
        learn_sigma=False,
        mlp_ratio=args.mlp_ratio,
    )


def flow_matching_loss(model: SiTTransformer2DModel, x_data: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rectified flow in paper time: x_t = t x + (1 - t) eps, target x - eps; MSE over all pixels."""
    b = x_data.shape[0]
    t = torch.rand(b, generator=generator)
    noise = torch.randn(x_data.shape, generator=generator)
    x_t = t.view(b, 1, 1, 1) * x_data + (1 - t.view(b, 1, 1, 1)) * noise
    pred = model.velocity_from_output(model(x_t, t, labels).sample)
    return F.mse_loss(pred, x_data - noise)


def train(args: argparse.Namespace) -> tuple[SiTTransformer2DModel, dict]:
    """Train on the digits train split; returns the EMA model (eval mode) and a training record."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    split = digits_split(seed=args.split_seed)
    data, targets = to_flow_space(split.train_images), split.train_labels
    model = build_model(args)
    model.train()  # the SiT model has no dropout and no in-model label dropout: train() changes nothing
    ema = EMAModel(model.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))

    def lr_factor(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.train_steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    n = len(targets)
    order, cursor, running = torch.randperm(n, generator=generator), 0, None
    start = time.perf_counter()
    for step in range(args.train_steps):
        if cursor + args.batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        labels = targets[idx].clone()
        labels[torch.rand(len(idx), generator=generator) < args.label_dropout] = model.null_class
        loss = flow_matching_loss(model, data[idx], labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema.step(model.parameters())
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        if (step + 1) % args.log_every == 0 or step + 1 == args.train_steps:
            print(f"step {step + 1}/{args.train_steps}  loss {running:.4f}  {time.perf_counter() - start:.0f} s", flush=True)
    ema.copy_to(model.parameters())
    model.eval()
    record = {
        "train_steps": args.train_steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "label_dropout": args.label_dropout,
        "seed": args.seed,
        "split_seed": args.split_seed,
        "train_images": n,
        "final_loss_ema": round(running, 4),
        "train_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, record


def save(model: SiTTransformer2DModel, folder: Path, args: argparse.Namespace) -> None:
    """Save a SiTPipeline (pixel space: vae=None) plus the sampling defaults."""
    from diffusers_am.pipelines.sit import SiTPipeline

    pipe = SiTPipeline(transformer=model, vae=None, default_num_inference_steps=args.num_inference_steps)
    pipe.save_pretrained(folder)
    defaults = {"num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale, "resolution": 8}
    write_json(folder / DEFAULTS_NAME, defaults)


def nearest_distance(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[N] L2 distance (pixels in [0, 1]) from each image [N, 1, 8, 8] to its nearest reference image."""
    return torch.cdist(images.flatten(1).float(), reference.flatten(1).float()).min(dim=1).values


@torch.no_grad()
def measure(folder: Path, args: argparse.Namespace) -> dict:
    """Sample ``eval_per_class`` digits per class through ``SiTPipeline.from_pretrained(folder)``
    at guidance 1.0 and the default; classifier accuracies and seconds per batch of 100."""
    from diffusers_am.pipelines.sit import SiTPipeline
    from diffusers_am.rewards.digits import load_digits_heldout_reward, load_digits_reward

    pipe = SiTPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    defaults = json.loads((folder / DEFAULTS_NAME).read_text())
    classifiers = {"heldout": load_digits_heldout_reward(), "reward": load_digits_reward()}
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.eval_per_class)
    split = digits_split(seed=args.split_seed)
    test_distance = float(nearest_distance(split.test_images, split.train_images).mean())
    results = {
        "num_inference_steps": defaults["num_inference_steps"],
        "per_class": args.eval_per_class,
        "test_nearest_train_distance": round(test_distance, 4),
        "guidance": {},
    }
    scales = {1.0, float(defaults["guidance_scale"]), *args.eval_guidance_scales}
    for guidance in sorted(scales):
        generator = torch.Generator().manual_seed(args.eval_seed)
        images, seconds = [], []
        for start in range(0, len(labels), 100):
            chunk = labels[start : start + 100]
            t0 = time.perf_counter()
            out = pipe(
                class_labels=chunk.tolist(),
                num_inference_steps=defaults["num_inference_steps"],
                guidance_scale=guidance,
                generator=generator,
                output_type="pt",
            )
            seconds.append(time.perf_counter() - t0)
            images.append(out.images)
        images = torch.cat(images)
        entry = {"seconds_per_100": round(sum(seconds) / len(seconds), 3)}
        for name, clf in classifiers.items():
            log_probs = clf.log_probs(images)
            entry[f"{name}_accuracy"] = round(float((log_probs.argmax(-1) == labels).float().mean()), 4)
            entry[f"{name}_mean_log_prob"] = round(float(log_probs.gather(1, labels[:, None]).mean()), 4)
        per_class = (classifiers["heldout"].log_probs(images).argmax(-1) == labels).view(NUM_CLASSES, -1).float().mean(1)
        entry["heldout_accuracy_per_class"] = [round(float(a), 3) for a in per_class]
        entry["nearest_train_distance"] = round(float(nearest_distance(images, split.train_images).mean()), 4)
        results["guidance"][f"{guidance:g}"] = entry
        print(f"guidance {guidance:g}: {entry}", flush=True)
    return results


def write_card(folder: Path, args: argparse.Namespace, record: dict, results: dict) -> None:
    defaults = json.loads((folder / DEFAULTS_NAME).read_text())
    rows = "\n".join(
        f"| {g} | {e['heldout_accuracy']:.3f} | {e['reward_accuracy']:.3f} | {e['heldout_mean_log_prob']:.3f} | "
        f"{e['reward_mean_log_prob']:.3f} | {e['nearest_train_distance']:.3f} | {e['seconds_per_100']:.2f} |"
        for g, e in results["guidance"].items()
    )
    size_mb = sum(p.stat().st_size for p in folder.rglob("*.safetensors")) / 1e6
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    arch = (
        f"{cfg['num_layers']} blocks, {cfg['num_attention_heads']} heads x {cfg['attention_head_dim']}, "
        f"mlp ratio {cfg['mlp_ratio']}"
    )
    training = (
        f"{record['train_steps']} steps, batch {record['batch_size']}, AdamW lr {record['lr']} (warmup, cosine to 10%), "
        f"EMA {record['ema_decay']}, label dropout {record['label_dropout']}, seed {record['seed']}; "
        f"{record['train_seconds']:.0f} s on {record['threads']} CPU thread(s); {record['num_parameters']} parameters."
        if record
        else "see the training command."
    )
    text = f"""# digits-sit: the embedded default base

A tiny class-conditional SiT-style flow (`SiTTransformer2DModel`, pixel space, `SiTPipeline`
with `vae=None`) trained on the scikit-learn 8x8 digits. It is the default base of
`diffusers-am` (`diffusers_am.models.EMBEDDED_DIGITS_BASE`): fine-tuning runs on a CPU in
minutes, offline.

- Data: `sklearn.datasets.load_digits`, the 80% train split (split seed {args.split_seed},
  {record.get('train_images', 'see script')} images), pixels / 16 scaled to [-1, 1]; images decode with `x * 0.5 + 0.5`.
- Model: sample size 8, 1 channel, patch 2 (16 tokens), {arch}; 10 classes + null class 10 for
  classifier-free guidance; velocity `x_data - noise` in paper time (t: 0 noise -> 1 data),
  no learn-sigma head.
- Objective: rectified flow `x_t = t x + (1 - t) eps`, t ~ U[0, 1], MSE to `x - eps`.
- Training: {training}
- Sampling defaults (`{DEFAULTS_NAME}`): {defaults['num_inference_steps']} Euler steps, guidance scale
  {defaults['guidance_scale']}. Weights: {size_mb:.2f} MB safetensors.

## Quality

{results['per_class']} samples per class ({NUM_CLASSES * results['per_class']} in all), {results['num_inference_steps']} Euler steps,
sampled through `SiTPipeline.from_pretrained` of this folder, seed {args.eval_seed}. Accuracy = the
classifier's top-1 class equals the conditioning class. "held-out" is the independently trained
classifier (`digits-heldout`), "reward" the reward classifier (`digits`). "NN-train dist." is the
mean L2 distance (pixels in [0, 1]) from a sample to its nearest training digit, a copy check:
real held-out test digits score {results['test_nearest_train_distance']:.3f}, copies would score near 0.
Seconds per batch of 100 on {args.threads} CPU thread(s) of a shared machine.

| guidance | held-out acc. | reward acc. | held-out mean log p | reward mean log p | NN-train dist. | s / 100 samples |
|---|---|---|---|---|---|---|
{rows}

Reproduce: `python scripts/train_digits_base.py` (train, save, measure) or
`python scripts/train_digits_base.py --eval_only` (measure only).
"""
    (folder / "README.md").write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=Path(EMBEDDED_DIGITS_BASE))
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--num_attention_heads", type=int, default=4)
    p.add_argument("--attention_head_dim", type=int, default=16)
    p.add_argument("--mlp_ratio", type=float, default=4.0)
    p.add_argument("--train_steps", type=int, default=4000)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup_steps", type=int, default=200)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--label_dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split_seed", type=int, default=0, help="train/test split seed (shared with the classifiers)")
    p.add_argument("--num_inference_steps", type=int, default=20, help="default recorded in the folder")
    p.add_argument("--guidance_scale", type=float, default=1.0, help="default recorded in the folder")
    p.add_argument("--eval_per_class", type=int, default=100)
    p.add_argument("--eval_seed", type=int, default=1234)
    p.add_argument(
        "--eval_guidance_scales", type=lambda s: [float(v) for v in s.split(",") if v.strip()], default=[1.5, 2.0],
        help="guidance scales measured besides 1.0 and the default (comma-separated)",
    )
    p.add_argument("--eval_only", action="store_true", help="measure the saved folder; no training")
    p.add_argument("--log_every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    args = p.parse_args(argv)
    try:
        for name in ("train_steps", "batch_size", "num_inference_steps", "eval_per_class", "log_every"):
            positive_int(getattr(args, name), f"--{name}")
    except ValueError as err:
        p.error(str(err))
    if not 0.0 <= args.label_dropout < 1.0:
        p.error("--label_dropout must be in [0, 1)")
    if not 0.0 < args.ema_decay < 1.0:
        p.error("--ema_decay must be in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = args.output_dir
    record: dict = {}
    if args.eval_only:
        record_file = folder / "training_record.json"
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    else:
        model, record = train(args)
        save(model, folder, args)
        write_json(folder / "training_record.json", record)
        print(f"saved {folder} ({record['train_seconds']} s of training)")
    results = measure(folder, args)
    write_json(folder / "quality.json", results)
    write_card(folder, args, record, results)


if __name__ == "__main__":
    main()
