#!/usr/bin/env python
"""The paper's method comparison in miniature on the embedded digits testbed (CPU, a few minutes).

    python benchmarks/digits_methods.py --output benchmarks/DIGITS_RESULTS.md --json /tmp/digits_methods.json

For each method configuration this runs the real trainer (``diffusers_am.training``) on the
embedded digits base with the trainer's default settings (same seed, same number of updates),
then evaluates every adapter together against the base with ``diffusers_am.evaluate.evaluate``
(same initial noise for every model): the ``digits`` reward the runs trained on, the held-out
``digits-heldout`` reward and argmax accuracy of the held-out classifier, within-class diversity
(1 - SSIM and held-out feature distance) and Recall / Coverage against the base samples in the
held-out classifier's feature space. Seconds / update is the median of ``train_log.jsonl``'s
``seconds``. Prints a markdown table; ``--output`` writes it with the command, date and machine,
``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NUM_INFERENCE_STEPS = 20
"""N of the embedded digits base (its default); passed explicitly so that K = N for ``-Full``."""

P4_REWARD_SCALE = 100.0
"""lambda of ``4th ODE-AM-4``: |u*| = |a|^(1/(p-1)) shrinks the control at lambda = 10 (final per-step control norms
~0.5-0.67 vs ~0.8-1.0 for p = 2 in a 100-update check); lambda = 100 gives ~0.9-1.14, the closest match."""

HELDOUT_ACCURACY = "digits-heldout-accuracy"


@dataclass(frozen=True)
class MethodConfig:
    name: str
    method: str
    truncate_steps: int | None  # None: K = N (full)
    reg_order: float | None  # None: not an AM objective of order p (DRaFT / ReFL)
    reward_scale: float | None = None  # None: the trainer's default
    learning_rate: float | None = None  # None: the trainer's default

    def k(self, n_steps: int) -> int:
        return n_steps if self.truncate_steps is None else self.truncate_steps

    def trainer_args(self, n_steps: int) -> list[str]:
        args = ["--method", self.method, "--truncate_steps", str(self.k(n_steps))]
        if self.reg_order is not None and self.method == "ode-am":
            args += ["--reg_order", f"{self.reg_order:g}"]
        if self.reward_scale is not None:
            args += ["--reward_scale", f"{self.reward_scale:g}"]
        if self.learning_rate is not None:
            args += ["--learning_rate", f"{self.learning_rate:g}"]
        return args


CONFIGS: dict[str, MethodConfig] = {
    c.name: c
    for c in (
        MethodConfig("2nd ODE-AM-4", "ode-am", 4, 2.0),
        MethodConfig("2nd ODE-AM-1", "ode-am", 1, 2.0),
        MethodConfig("2nd ODE-AM-Full", "ode-am", None, 2.0),
        MethodConfig("4th ODE-AM-4", "ode-am", 4, 4.0, reward_scale=P4_REWARD_SCALE),
        MethodConfig("2nd SDE-AM-4", "sde-am", 4, 2.0),  # KL (quadratic) control cost
        MethodConfig("DRaFT-1", "draft", 1, None),
        MethodConfig("ReFL-4", "refl", 4, None),
    )
}

COLUMNS = [
    "method", "K", "p", "lambda", "s/update", "digits reward", "held-out reward", "held-out acc",
    "diversity (1-SSIM)", "diversity (feat. dist.)", "recall", "coverage",
]


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name).strip("-")


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def train_one(cfg: MethodConfig, out_dir: Path, *, max_train_steps: int | None, seed: int, cpu_threads: int,
              n_steps: int, quiet: bool = False) -> dict[str, Any]:
    from diffusers_am.training import AdjointMatchingTrainer, parse_args

    argv = cfg.trainer_args(n_steps) + [
        "--num_inference_steps", str(n_steps), "--seed", str(seed), "--report_to", "none",
        "--num_eval_samples", "0", "--validation_steps", "0", "--num_validation_images", "1",
        "--cpu_threads", str(cpu_threads), "--output_dir", str(out_dir), "--overwrite_output_dir",
    ]
    if max_train_steps is not None:
        argv += ["--max_train_steps", str(max_train_steps)]
    config = parse_args(argv)
    start = time.perf_counter()
    _reset_accelerate()
    try:
        if quiet:  # the trainer's progress bars (stderr) go to a file beside the run
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir.parent / f"{out_dir.name}.stderr.log", "w") as err, contextlib.redirect_stderr(err):
                result = AdjointMatchingTrainer(config).train()
        else:
            result = AdjointMatchingTrainer(config).train()
    finally:
        _reset_accelerate()
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in result.log_path.read_text().splitlines() if line.strip()]
    seconds = [r["seconds"] for r in records if "seconds" in r]
    rewards = [r["reward_mean"] for r in records if r.get("reward_mean") is not None]
    return {
        "name": cfg.name, "method": cfg.method, "K": cfg.k(n_steps), "N": n_steps,
        "p": cfg.reg_order, "reward_scale": config.reward_scale, "learning_rate": config.learning_rate,
        "max_train_steps": config.max_train_steps, "seed": seed, "trainer_argv": argv,
        "seconds_per_update_median": statistics.median(seconds) if seconds else None,
        "train_wall_seconds": wall, "skipped_updates": result.skipped_updates,
        "train_reward_first": rewards[0] if rewards else None,
        "train_reward_last10": statistics.mean(rewards[-10:]) if rewards else None,
        "adapter_dir": str(out_dir),
    }


# -- table -------------------------------------------------------------------------------------
def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{v:.{digits}f}"


def build_rows(runs: list[dict[str, Any]], models: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    rows = []
    entries = [({"name": "base (no fine-tuning)"}, models["base"])] + [(r, models[slug(r["name"])]) for r in runs]
    for run, m in entries:
        rows.append({
            "method": run["name"],
            "K": run.get("K"),
            "p": run.get("p") if run.get("method") in ("ode-am", "sde-am") else None,
            "lambda": run.get("reward_scale"),
            "s/update": run.get("seconds_per_update_median"),
            "digits reward": m.get("reward/digits"),
            "held-out reward": m.get("reward/digits-heldout"),
            "held-out acc": m.get(f"reward/{HELDOUT_ACCURACY}"),
            "diversity (1-SSIM)": m.get("diversity/ssim"),
            "diversity (feat. dist.)": m.get("diversity/feature_distance"),
            "recall": m.get("recall"),
            "coverage": m.get("coverage"),
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for row in rows:
        cells = [row["method"]]
        cells.append("–" if row["K"] is None else str(row["K"]))
        cells.append("–" if row["p"] is None else f"{row['p']:g}")
        cells.append("–" if row["lambda"] is None else f"{row['lambda']:g}")
        cells.append(_num(row["s/update"], 3))
        cells += [_num(row[c]) for c in COLUMNS[5:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(table: str, args: argparse.Namespace, argv: Sequence[str], runs: list[dict[str, Any]], total: float,
           n_eval: int) -> str:
    cmd = "python benchmarks/digits_methods.py " + " ".join(shlex.quote(a) for a in argv)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lam = {r["name"]: r["reward_scale"] for r in runs}
    lr = {r["name"]: r["learning_rate"] for r in runs}
    steps = runs[0]["max_train_steps"] if runs else args.max_train_steps
    return (
        "# Digits testbed: the paper's method comparison in miniature\n\n"
        f"```bash\n{cmd.strip()}\n```\n\n"
        f"- date: {now}; machine: {os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), "
        f"torch {torch.__version__}, trainer on {args.cpu_threads} thread(s); whole script {total:.0f} s\n"
        f"- every run: the trainer's defaults on the embedded digits base (N = {args.num_inference_steps}, "
        f"{steps} updates, batch 16, LoRA rank 8, seed {args.seed}); lambda per run: "
        + ", ".join(f"{k} {v:g}" for k, v in lam.items()) + "; lr: "
        + ", ".join(sorted({f'{v:g}' for v in lr.values()})) + "\n"
        f"- evaluation: `diffusers_am.evaluate.evaluate` on all 10 classes x {args.num_images_per_prompt} images "
        f"= {n_eval} images per model, the same initial noise for every model (seed {args.seed}); rewards are "
        "log p(class | image) (<= 0); held-out acc = argmax accuracy of the held-out classifier; diversity is "
        "within-class; Recall / Coverage (k = 5) against the base samples in the held-out classifier's features\n"
        "- s/update: median of `train_log.jsonl` `seconds`\n\n"
        + table
    )


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(CONFIGS),
                   help=f"comma-separated subset of: {', '.join(CONFIGS)} (default: all)")
    p.add_argument("--max_train_steps", type=int, default=None, help="updates per run (default: the trainer's default)")
    p.add_argument("--num_images_per_prompt", type=int, default=20, help="eval images per class (10 classes)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run and of the evaluation noise")
    p.add_argument("--num_inference_steps", type=int, default=NUM_INFERENCE_STEPS, help="N (the base's default: 20)")
    p.add_argument("--cpu_threads", type=int, default=1, help="torch threads for training and evaluation")
    p.add_argument("--work_dir", default=None, help="where the runs and the eval report go (default: a temp dir)")
    p.add_argument("--output", default=None, help="write the markdown report here")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--quiet", action="store_true", help="no progress bars (the trainer's go to <work_dir>/runs/<method>.stderr.log)")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in CONFIGS]
    if unknown or not names:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    args.method_list = names
    from diffusers_am.checks import positive_int

    try:
        positive_int(args.num_images_per_prompt, "--num_images_per_prompt")
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from diffusers_am.evaluate import evaluate
    from diffusers_am.models import EMBEDDED_DIGITS_BASE

    from diffusers.utils import logging as diffusers_logging

    bars_were_on = diffusers_logging.is_progress_bar_enabled()
    if args.quiet:
        diffusers_logging.disable_progress_bar()
    start = time.perf_counter()
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="digits_methods_")
        work = Path(tmp.name)
    else:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        runs = []
        for name in args.method_list:
            print(f"== training {name}", flush=True)
            run = train_one(CONFIGS[name], work / "runs" / slug(name), max_train_steps=args.max_train_steps,
                            seed=args.seed, cpu_threads=args.cpu_threads, n_steps=args.num_inference_steps,
                            quiet=args.quiet)
            print(f"   {run['seconds_per_update_median']:.3f} s/update (median), train reward "
                  f"{run['train_reward_first']:.4f} -> {run['train_reward_last10']:.4f} (last 10 mean), "
                  f"{run['skipped_updates']} skipped", flush=True)
            runs.append(run)
        print(f"== evaluating the base and {len(runs)} adapter(s)", flush=True)
        torch.set_num_threads(args.cpu_threads)
        results = evaluate(
            str(EMBEDDED_DIGITS_BASE), adapters=[r["adapter_dir"] for r in runs], prompts=None,
            num_images_per_prompt=args.num_images_per_prompt,
            rewards=["digits", "digits-heldout", HELDOUT_ACCURACY], output_dir=work / "eval",
            num_inference_steps=args.num_inference_steps, seed=args.seed, progress=not args.quiet,
        )
    finally:
        torch.set_num_threads(threads)
        if bars_were_on:
            diffusers_logging.enable_progress_bar()
    total = time.perf_counter() - start
    n_eval = len(results["config"]["prompts"]) * args.num_images_per_prompt
    rows = build_rows(runs, results["models"])
    table = markdown(rows)
    print()
    print(table)
    print(f"total {total:.0f} s")
    text = report(table, args, argv, runs, total, n_eval)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    out = {"rows": rows, "runs": runs, "eval": results, "total_seconds": total, "table": table,
           "torch": torch.__version__, "cpu_count": os.cpu_count()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        from diffusers_am.jsonio import dumps
        Path(args.json).write_text(dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return out


if __name__ == "__main__":
    main()
