#!/usr/bin/env python
"""Start-up time of the command line: ``--help``, the imports a default run pays before its first update
(with bitsandbytes held back, as the trainer does unless a flag needs it, and importable, as before), and
optionally a whole 1-update default run. Each row runs a fresh interpreter ``--repeats`` times (default 5)
and prints the median wall time with the spread (min-max).

    python benchmarks/startup.py                        # this checkout
    python benchmarks/startup.py --run                  # also a 1-update default run end to end
    python benchmarks/startup.py --repo /path/to/other/checkout   # the same rows for another checkout

A row that a checkout cannot run (an older one without ``diffusers_am.bnb``) prints "n/a".
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

RUN_IMPORTS = (
    "import diffusers_am.training.trainer, diffusers_am.models.sit, peft.tuners.lora.model; "
    "import sys; assert ('bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is not None) == {expect}"
)
"""The modules a default run imports before its first update (trainer, the digits model adapter, peft's LoRA),
then a check that bitsandbytes was (or was not) imported."""


def rows(run: bool, out: Path) -> dict[str, list[str]]:
    py = sys.executable
    table = {
        "python -m diffusers_am.train --help": [py, "-m", "diffusers_am.train", "--help"],
        "imports of a default run, bitsandbytes held back (now)": [
            py, "-c", "from diffusers_am.bnb import defer_bitsandbytes; defer_bitsandbytes(); "
            + RUN_IMPORTS.format(expect=False),
        ],
        "imports of a default run, bitsandbytes importable (before)": [py, "-c", RUN_IMPORTS.format(expect=True)],
    }
    if run:
        table["default run, 1 update, no eval (end to end)"] = [
            py, "-m", "diffusers_am.train", "--max_train_steps", "1", "--num_eval_samples", "0",
            "--report_to", "none", "--overwrite_output_dir", "--output_dir", str(out / "run"),
        ]
    return table


def measure(command: list[str], repo: Path, repeats: int) -> list[float] | None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            return None
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", action="store_true", help="also time a 1-update default run end to end")
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout to time (default: this one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"checkout: {args.repo}; {args.repeats} fresh processes per row; {os.cpu_count()} CPU cores\n")
        print("| what | median s | min-max s |")
        print("|---|---:|---:|")
        for name, command in rows(args.run, Path(tmp)).items():
            times = measure(command, args.repo.resolve(), args.repeats)
            if times is None:
                print(f"| {name} | n/a | n/a |")
            else:
                print(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f}-{max(times):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
