"""ODE-AM, DRaFT-K and ReFL-K on the shipped ``shapes-klein`` miniature, same budget; prints a table.

Each method trains with ``train_adjoint_matching.py``'s trainer from ``--pretrained shapes-klein`` (the
folder's defaults: reward ``shapes``, the 120 training captions, 32 px, N steps, guidance) for the same
number of updates, batch, K and learning rate; then :func:`diffusers_am.evaluate.evaluate` samples the
base and every adapter on the same noise for the 24 held-out compositions and measures:

* gold: exact-match accuracy of the pixel checker ``shapes-gold`` (the judge; never trained on);
* the training reward ``shapes`` and the independently trained ``shapes-heldout``;
* within-prompt diversity: 1 - SSIM and the distance of ``shapes-heldout`` classifier features (LPIPS needs
  ImageNet weights that cannot be had offline, 1 - MS-SSIM needs images above 160 px: both are out at 32 px);
* Recall / Coverage (k = 5) of each model's samples against the base's, in ``shapes-heldout`` features.

    python benchmarks/shapes_klein_methods.py --seeds 0 1 2 --output_dir outputs/shapes-bench

Per-method flags: ``--ode_am_args "--reward_scale 10 --reg_order 2"`` etc. (appended to that method's run).
``--reuse`` evaluates runs already in ``--output_dir`` (e.g. the three methods started side by side with
``python -m diffusers_am.train --pretrained shapes-klein --method M --truncate_steps K --seed S
--output_dir <output_dir>/M-seedS``) instead of training them again.
Writes ``results.json`` and the evaluation report per seed (``eval-seed<s>/``: metrics, and
``samples_<model>.png``: one held-out prompt per row, the same noise in every model's grid).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

METHODS = ("ode-am", "draft", "refl")
COLUMNS = (
    ("gold", "reward/shapes-gold"),
    ("shapes", "reward/shapes"),
    ("shapes-heldout", "reward/shapes-heldout"),
    ("1-SSIM", "diversity/ssim"),
    ("feat. dist.", "diversity/feature_distance"),
    ("recall", "recall"),
    ("coverage", "coverage"),
)


def train_one(method: str, seed: int, out: Path, common: list[str], extra: list[str], reuse: bool = False) -> dict:
    from accelerate.state import AcceleratorState

    summary = out / "train_summary.json"
    if reuse and summary.is_file():  # a finished run of the same command (e.g. started in parallel by hand)
        done = json.loads(summary.read_text())
        return {k: done[k] for k in ("reward_before", "reward_after", "seconds_per_update")} | {"reused": str(out)}

    from diffusers_am.training import AdjointMatchingTrainer
    from diffusers_am.training.config import parse_args

    args = ["--pretrained", "shapes-klein", "--method", method, "--seed", str(seed), "--output_dir", str(out),
            "--overwrite_output_dir", "--report_to", "none", *common, *extra]
    start = time.perf_counter()
    result = AdjointMatchingTrainer(parse_args(args)).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    return {"reward_before": result.reward_before, "reward_after": result.reward_after,
            "seconds": round(time.perf_counter() - start, 1), "seconds_per_update": result.seconds_per_update,
            "args": args}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max_train_steps", type=int, default=100)
    parser.add_argument("--common_args", default="", help="flags for every run (e.g. '--truncate_steps 4')")
    parser.add_argument("--ode_am_args", default="")
    parser.add_argument("--draft_args", default="--truncate_steps 1", help="DRaFT-1 by default")
    parser.add_argument("--refl_args", default="")
    parser.add_argument("--num_images_per_prompt", type=int, default=8)
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/shapes-bench"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", action="store_true",
                        help="use <output_dir>/<method>-seed<s> runs (and eval-seed<s> reports) that finished already")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers_am.evaluate import evaluate
    from diffusers_am.toy.shapes import heldout_captions

    common = ["--max_train_steps", str(args.max_train_steps), "--cpu_threads", str(args.threads),
              *shlex.split(args.common_args)]
    extra = {"ode-am": args.ode_am_args, "draft": args.draft_args, "refl": args.refl_args}
    results: dict = {"runs": {}, "eval": {}}
    for seed in args.seeds:
        outs = []
        for method in args.methods:
            out = args.output_dir / f"{method}-seed{seed}"
            results["runs"][f"{method}/{seed}"] = train_one(method, seed, out, common, shlex.split(extra[method]), args.reuse)
            print(f"{method} seed {seed}: reward {results['runs'][f'{method}/{seed}']['reward_before']:.3f} -> "
                  f"{results['runs'][f'{method}/{seed}']['reward_after']:.3f}", flush=True)
            outs.append(out)
        report = args.output_dir / f"eval-seed{seed}" / "metrics.json"
        if args.reuse and report.is_file():  # this seed was evaluated already
            results["eval"][str(seed)] = json.loads(report.read_text())["models"]
            continue
        ev = evaluate("shapes-klein", adapters=outs, prompts=heldout_captions(),
                      num_images_per_prompt=args.num_images_per_prompt,
                      rewards=["shapes-gold", "shapes", "shapes-heldout"], feature_extractor="shapes-heldout",
                      diversity="ssim,feature_distance", output_dir=args.output_dir / f"eval-seed{seed}", seed=1000 + seed,
                      progress=False)
        results["eval"][str(seed)] = ev["models"]
        (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    # table: mean +- std over seeds
    print(f"\nshapes-klein, {args.max_train_steps} updates, held-out compositions "
          f"({len(heldout_captions())} prompts x {args.num_images_per_prompt} images), seeds {args.seeds}")
    header = "| model | train reward before -> after | " + " | ".join(c[0] for c in COLUMNS) + " | s / update |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    names = ["base"] + [f"{m}-seed" for m in args.methods]
    for name, method in zip(names, [None, *args.methods]):
        cells = []
        if method is None:
            cells.append("")
        else:
            runs = [results["runs"][f"{method}/{s}"] for s in args.seeds]
            before = statistics.mean(r["reward_before"] for r in runs)
            after = statistics.mean(r["reward_after"] for r in runs)
            cells.append(f"{before:.3f} -> {after:.3f}")
        for _, key in COLUMNS:
            vals = []
            for s in args.seeds:
                models = results["eval"][str(s)]
                model = models["base"] if method is None else models[f"{method}-seed{s}"]
                if key in model:
                    vals.append(model[key])
            if not vals:
                cells.append("")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}")
        spu = "" if method is None else f"{statistics.mean(results['runs'][f'{method}/{s}']['seconds_per_update'] for s in args.seeds):.2f}"
        print(f"| {method or 'base'} | " + " | ".join(cells) + f" | {spu} |")
    if "ode-am" in args.methods:
        folder = args.output_dir / f"eval-seed{args.seeds[0]}"
        print(f"samples: {folder}/samples_base.png, {folder}/samples_ode-am-seed{args.seeds[0]}.png")


if __name__ == "__main__":
    main()
