#!/usr/bin/env python
"""The paper's claims C1-C5 and adaptive truncation, claim by claim, with seeds, on the embedded digits base.

    python benchmarks/paper_claims.py --output benchmarks/PAPER_CLAIMS.md --json /tmp/paper_claims.json

Every configuration is a real trainer run (``python -m diffusers_am.train``, one subprocess each, ``--workers``
at a time, one torch thread each) on the embedded digits base (N = 20), repeated over ``--seeds``. Per seed,
``diffusers_am.evaluate.evaluate`` then samples the base and every adapter from the same noise (10 classes x
``--num_images_per_prompt``) and measures the trained ``digits`` reward, the held-out classifier's reward (the
unbiased judge), within-class diversity (1 - SSIM with a 3 px window, and the held-out classifier's feature
distance: LPIPS and MS-SSIM are not defined on 8 x 8 images), Recall and Coverage (k = 5) against the base in the
held-out features. C4 probes the base's optimal-control profile directly (:mod:`diffusers_am.probe`).

A verdict compares paired differences over seeds (same seed = same noise, prompts and evaluation): a claim
*holds* when the mean difference is in the claimed direction by more than two standard errors, *does not hold
here* when it is in the opposite direction by more than two, and is *inconclusive* otherwise (one seed is
always inconclusive). Writes the markdown report, PNG plots beside it and every number as JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

N_STEPS = 20
K_SWEEP = (1, 2, 4, 8, 12, 20)
P_LAMBDAS = (5.0, 10.0, 20.0)
"""The three strengths of the p sweep, as 2nd-order-ODE-AM lambdas (p = 4, 6 run at the matched lambda)."""
HELDOUT, TRAINED = "reward/digits-heldout", "reward/digits"
AUTO = "ODE-AM-auto p=2 lambda=10"


@dataclass(frozen=True)
class Run:
    """One trained configuration: ``args`` on top of the common trainer flags."""

    name: str
    args: tuple[str, ...]
    group: str  # K, p, baseline, sde, auto
    k: int | str = 4
    p: float | None = 2.0
    strength: float | None = 10.0  # lambda, or the 2nd-order lambda it is matched to

    @property
    def slug(self) -> str:
        name = self.name.replace("~", " matched ")
        return "-".join("".join(ch if ch.isalnum() else " " for ch in name).lower().split())


def am(k: int | str, p: float = 2.0, lam: float = 10.0, *extra: str, group: str = "K", name: str = "") -> Run:
    matched = ("--match_reward_scale", "velocity") if p != 2.0 else ()
    strength = f"lambda~{lam:g}" if matched else f"lambda={lam:g}"
    label = name or f"ODE-AM-{'Full' if k == N_STEPS else k} p={p:g} {strength}"
    args = ("--method", "ode-am", "--truncate_steps", str(k), "--reg_order", f"{p:g}", "--reward_scale", f"{lam:g}")
    return Run(label, args + matched + extra, group, k, p, lam)


def all_runs() -> list[Run]:
    runs = [am(k) for k in K_SWEEP]
    for p in (2.0, 4.0, 6.0):
        runs += [am(4, p, lam, group="p") for lam in P_LAMBDAS if not (p == 2.0 and lam == 10.0)]
    runs += [
        Run("DRaFT-1", ("--method", "draft", "--truncate_steps", "1"), "baseline", 1, None, 10.0),
        Run("ReFL-4", ("--method", "refl", "--truncate_steps", "4"), "baseline", 4, None, 10.0),
    ]
    sde = ("--method", "sde-am", "--truncate_steps", "4")
    runs += [
        Run("SDE-AM-4 memoryless lambda=10", sde, "sde", 4, 2.0, 10.0),
        Run("SDE-AM-4 memoryless lambda~10", sde + ("--match_reward_scale", "velocity"), "sde", 4, 2.0, 10.0),
        Run("SDE-AM-4 constant lambda~10", sde + ("--sde_schedule", "constant", "--match_reward_scale", "velocity"),
            "sde", 4, 2.0, 10.0),
    ]
    runs.append(am("auto", 2.0, 10.0, group="auto", name=AUTO))
    return runs


QUICK = ("ODE-AM-1 p=2 lambda=10", "ODE-AM-4 p=2 lambda=10", "ODE-AM-Full p=2 lambda=10", "ODE-AM-4 p=4 lambda~10",
         "DRaFT-1", "SDE-AM-4 memoryless lambda~10", AUTO)


# -- training -------------------------------------------------------------------------------------
def train(run: Run, seed: int, out: Path, steps: int, reuse: bool = False) -> dict[str, Any]:
    """Train one (run, seed) in a subprocess; returns its log numbers. ``reuse``: a finished run already in
    ``out`` with ``steps`` updates is read, not trained again (``wall_seconds`` is then None)."""
    if reuse and _finished(out, steps):
        return _numbers(out, None)
    argv = [sys.executable, "-m", "diffusers_am.train", *run.args, "--num_inference_steps", str(N_STEPS),
            "--seed", str(seed), "--max_train_steps", str(steps), "--report_to", "none", "--num_eval_samples", "0",
            "--validation_steps", "0", "--num_validation_images", "1", "--cpu_threads", "1",
            "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{run.name} (seed {seed}) failed:\n{proc.stderr[-2000:]}")
    return _numbers(out, time.perf_counter() - start)


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


def _finished(out: Path, steps: int) -> bool:
    return (out / "train_summary.json").is_file() and len(_records(out)) == steps


def _numbers(out: Path, wall: float | None) -> dict[str, Any]:
    """What the report reads from a finished run's log and summary."""
    records = _records(out)
    summary = json.loads((out / "train_summary.json").read_text())
    ks = [r["truncate_steps"] for r in records]
    return {
        "seconds_per_update": statistics.median(r["seconds"] for r in records),
        "seconds_per_update_mean": statistics.mean(r["seconds"] for r in records),
        "wall_seconds": wall,
        "reward_scale": summary["reward_scale"],
        "k_mean": statistics.mean(ks),
        "k_values": sorted(set(ks)),
        "skipped": summary["skipped_updates"],
    }


def train_all(runs: list[Run], seeds: Sequence[int], work: Path, steps: int, workers: int, reuse: bool = False) -> dict:
    """{(run name, seed): log numbers}, ``workers`` trainings at a time."""
    jobs = [(run, seed) for seed in seeds for run in runs]
    out: dict[tuple[str, int], dict[str, Any]] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(train, r, s, work / f"seed{s}" / r.slug, steps, reuse): (r, s) for r, s in jobs}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            run, seed = futures[future]
            out[(run.name, seed)] = future.result()
            print(f"[{i}/{len(jobs)}] {run.name} seed {seed}: {out[(run.name, seed)]['seconds_per_update']:.3f} "
                  f"s/update", flush=True)
    return out


def timing_pass(runs: list[Run], work: Path, updates: int, reuse: bool) -> dict[str, float]:
    """{run name: mean seconds per update} of the K sweep and the adaptive run, one run at a time (seed 0,
    ``updates`` updates; the mean, so that the adaptive window's probe every 10 updates counts)."""
    names = [k_name(k) for k in K_SWEEP] + [AUTO]
    out = {}
    for run in (r for r in runs if r.name in names):
        numbers = train(run, 0, work / "timing" / run.slug, updates, reuse)
        out[run.name] = numbers["seconds_per_update_mean"]
        print(f"[timing] {run.name}: {out[run.name]:.3f} s/update (mean of {updates})", flush=True)
    return out


def evaluate_seed(runs: list[Run], seed: int, work: Path, images: int) -> dict[str, dict[str, float]]:
    """{run name or 'base': metrics} for one seed (same noise for every model)."""
    from digits_methods import HELDOUT_ACCURACY

    from diffusers_am.evaluate import evaluate
    from diffusers_am.models import EMBEDDED_DIGITS_BASE

    torch.set_num_threads(1)  # like the trainings; more threads on a busy CPU only spin
    results = evaluate(
        str(EMBEDDED_DIGITS_BASE), adapters=[str(work / f"seed{seed}" / r.slug) for r in runs], prompts=None,
        num_images_per_prompt=images, rewards=["digits", "digits-heldout", HELDOUT_ACCURACY],
        output_dir=work / f"eval-seed{seed}", num_inference_steps=N_STEPS, seed=seed, progress=False,
    )
    models = results["models"]
    return {"base": models["base"], **{r.name: models[r.slug] for r in runs}}


# -- C4: the control profile --------------------------------------------------------------------------
def control_profiles(seed: int, batch: int = 64) -> dict[str, Any]:
    """The base's optimal-control intensity per step for p = 2, 4, 6 (one probe, 64 samples), its peak time,
    and the Gaussian prediction t* = 1 / (1 + s^2) with s^2 the base samples' mean per-dimension variance."""
    from diffusers_am.models import EMBEDDED_DIGITS_BASE, LoraSettings, load_model_adapter
    from diffusers_am.probe import probe_control_profile
    from diffusers_am.rewards import load_reward
    from diffusers_am.toy.gaussian import GaussianToy
    from diffusers_am.prompts import derive_seed

    torch.manual_seed(seed)
    adapter = load_model_adapter(str(EMBEDDED_DIGITS_BASE))
    adapter.add_lora(LoraSettings(rank=8))  # zero-initialised: the flow is the base
    reward = load_reward("digits")
    gen = torch.Generator().manual_seed(derive_seed(seed, "claims-probe"))
    labels = torch.randint(10, (batch,), generator=gen).tolist()
    noise = adapter.initial_noise(batch, adapter.default_resolution, gen)
    times = adapter.time_grid(N_STEPS, adapter.default_resolution)
    flow = adapter.flow(adapter.encode_conditions(labels), train_module=adapter.transformer)
    profile = probe_control_profile(flow, noise, times, lambda x: reward(adapter.decode(x), labels), reward_scale=10.0)
    with torch.no_grad():
        from diffusers_am.flow import sample_euler

        x1 = sample_euler(flow.velocity, noise, times, record_last=1)[-1]
    s2 = float(x1.float().reshape(batch, -1).var(0).mean())
    t = profile.step_times()
    out = {"times": t.tolist(), "data_variance": s2, "predicted_peak": 1.0 / (1.0 + s2)}
    toy = GaussianToy(std=math.sqrt(s2))
    for p in (2.0, 4.0, 6.0):
        intensity = profile.with_order(p).intensity_per_step()
        norm = intensity / intensity.max()
        out[f"p{p:g}"] = {
            "intensity": norm.tolist(),
            "peak_time": float(t[int(intensity.argmax())]),
            "flatness": float(norm.mean()),
            "gaussian": toy.normalized_profile(t.double(), p).tolist(),
        }
    return out


# -- statistics and verdicts ----------------------------------------------------------------------------
def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def paired(diffs: Sequence[float]) -> dict[str, Any]:
    """Mean, standard error and verdict of per-seed differences (claimed direction: positive)."""
    m, sd = mean_sd(diffs)
    se = sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    if not math.isfinite(se):
        verdict = "inconclusive"
    elif m > 2 * se:
        verdict = "holds"
    elif m < -2 * se:
        verdict = "does not hold here"
    else:
        verdict = "inconclusive"
    return {"mean": m, "se": se, "n": len(diffs), "verdict": verdict, "diffs": list(diffs)}


def unanimous(per_seed: Sequence[bool]) -> str:
    """A yes / no claim over seeds: holds when every seed says yes, does not hold when every seed says no
    (two seeds at least), else inconclusive."""
    if len(per_seed) < 2:
        return "inconclusive"
    return "holds" if all(per_seed) else "does not hold here" if not any(per_seed) else "inconclusive"


def fmt(m: float, sd: float | None = None, digits: int = 4) -> str:
    if m is None or not math.isfinite(m):
        return "–"
    if sd is None or not math.isfinite(sd):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def diff_text(d: dict[str, Any], digits: int = 4) -> str:
    return f"{d['mean']:+.{digits}f} (SE {d['se']:.{digits}f}, n = {d['n']}): **{d['verdict']}**"


@dataclass
class Table:
    """Per (run, seed) metrics, and helpers to read them."""

    runs: list[Run]
    seeds: list[int]
    train: dict
    evals: dict  # seed -> name -> metrics
    timing: dict = field(default_factory=dict)  # name -> s/update of the timing pass (one run at a time)

    def seconds(self, name: str, seed: int) -> float:
        """s/update for time comparisons: the timing pass's when it ran, else the sweep's (under contention)."""
        return self.timing.get(name) or self.metric(name, "seconds_per_update", seed)

    def metric(self, name: str, key: str, seed: int) -> float | None:
        if key == "gain":
            return self.evals[seed][name][HELDOUT] - self.evals[seed]["base"][HELDOUT]
        if key in ("seconds_per_update", "reward_scale", "k_mean"):
            return self.train[(name, seed)][key]
        return self.evals[seed][name].get(key)

    def values(self, name: str, key: str) -> list[float]:
        return [self.metric(name, key, s) for s in self.seeds]

    def diff(self, a: str, b: str, key: str, sign: float = 1.0) -> dict[str, Any]:
        return paired([sign * (self.metric(a, key, s) - self.metric(b, key, s)) for s in self.seeds])

    def has(self, name: str) -> bool:
        return any(r.name == name for r in self.runs)


COLUMNS = (("held-out reward", HELDOUT), ("gain", "gain"), ("digits reward", TRAINED),
           ("1-SSIM (3px)", "diversity/ssim"), ("feature dist.", "diversity/feature_distance"),
           ("recall", "recall"), ("coverage", "coverage"), ("s/update", "seconds_per_update"))


def results_table(t: Table, names: Sequence[str]) -> str:
    head = "| config | K | lambda used | " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    base = [t.evals[s]["base"] for s in t.seeds]
    cells = [fmt(*mean_sd([b.get(k) for b in base])) if k not in ("gain", "seconds_per_update") else "–"
             for _, k in COLUMNS]
    lines.append("| base (no fine-tuning) | – | – | " + " | ".join(cells) + " |")
    for name in names:
        if not t.has(name):
            continue
        k = fmt(*mean_sd(t.values(name, "k_mean")), digits=1)
        lam = fmt(*mean_sd(t.values(name, "reward_scale")), digits=1)
        cells = [fmt(*mean_sd(t.values(name, key)), digits=3 if key == "seconds_per_update" else 4)
                 for _, key in COLUMNS]
        lines.append(f"| {name} | {k} | {lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def k_name(k: int) -> str:
    return f"ODE-AM-{'Full' if k == N_STEPS else k} p=2 lambda=10"


def claim_c1(t: Table) -> tuple[str, dict]:
    ks = [k for k in K_SWEEP if t.has(k_name(k))]
    full, small = k_name(N_STEPS), k_name(4)
    out: dict[str, Any] = {}
    text = ["## C1: truncated AM-K reaches most of AM-Full's reward at a fraction of the time (Table 6)\n",
            results_table(t, [k_name(k) for k in ks])]
    if not (t.has(full) and t.has(small)):
        return "\n".join(text + ["(needs AM-4 and AM-Full)\n"]), out
    if t.timing:
        text.append("Time per update for the time comparisons (C1 and adaptive truncation): a separate timing pass, "
                    "one run at a time, mean over its updates (the sweep's s/update column ran two trainings at "
                    "once beside other jobs):\n")
        text.append("| config | s/update (timing pass) | relative to AM-Full |\n|---|---|---|")
        for name, sec in t.timing.items():
            text.append(f"| {name} | {sec:.3f} | {sec / t.timing.get(full, sec):.2f} |")
        text.append("")
    share = [t.metric(small, "gain", s) / t.metric(full, "gain", s) for s in t.seeds]
    time_ratio = [t.seconds(small, s) / t.seconds(full, s) for s in t.seeds]
    share_test = paired([v - 0.8 for v in share])
    out["share_of_full_gain_k4"] = {"values": share, **share_test}
    out["time_ratio_k4"] = time_ratio
    k90 = []
    for s in t.seeds:
        gains = {k: t.metric(k_name(k), "gain", s) for k in ks}
        top = max(gains.values())
        k90.append(min(k for k in ks if gains[k] >= 0.9 * top))
    out["k90"] = k90
    sat = unanimous([k / N_STEPS <= 0.3 for k in k90])
    out["verdict_most"] = share_test["verdict"]
    out["verdict_saturation"] = sat
    text.append(
        f"- AM-4 (K/N = 0.2, the paper's 10 of 50) keeps {fmt(*mean_sd(share), digits=2)} of AM-Full's held-out "
        f"reward gain per seed ({', '.join(f'{v:.2f}' for v in share)}) at {fmt(*mean_sd(time_ratio), digits=2)} of "
        f"its time per update. Share minus 0.8 (\"most\"): {diff_text(share_test, 3)}.")
    text.append(
        f"- Saturation: the smallest K reaching 90% of the best gain over K, per seed: {k90} (of N = {N_STEPS}); "
        f"the claim (about 20% of N, read as K/N <= 0.3) **{sat}**.")
    return "\n".join(text) + "\n", out


def best_lambda(t: Table, p: float) -> str | None:
    names = [r.name for r in t.runs if r.group in ("p", "K") and r.p == p and r.k == 4]
    names = [n for n in names if t.has(n)]
    return max(names, key=lambda n: statistics.mean(t.values(n, HELDOUT))) if names else None


def claim_c2(t: Table) -> tuple[str, dict]:
    names = [r.name for r in t.runs if r.group in ("p", "K") and r.k == 4 and r.p in (2.0, 4.0, 6.0)]
    text = ["## C2: higher order p (4, 6) at a suitable lambda aligns better than p = 2 (Tables 2, 5)\n",
            "p = 4 and 6 run at `--match_reward_scale velocity`: lambda~X is the lambda at which their target "
            "control has the size 2nd-order ODE-AM's has at lambda = X (the lambda used is in the table).\n",
            results_table(t, sorted(set(names), key=names.index))]
    out: dict[str, Any] = {}
    best = {p: best_lambda(t, p) for p in (2.0, 4.0, 6.0)}
    out["best"] = {f"p{p:g}": n for p, n in best.items()}
    if best[2.0] is None:
        return "\n".join(text) + "\n", out
    for p in (4.0, 6.0):
        if best[p] is not None:
            d = t.diff(best[p], best[2.0], HELDOUT)
            out[f"p{p:g}_vs_p2"] = d
            text.append(f"- best p = {p:g} ({best[p]}) minus best p = 2 ({best[2.0]}), held-out reward: {diff_text(d)}")
    if best[6.0] and best[4.0]:
        rival = max((best[2.0], best[4.0]), key=lambda n: statistics.mean(t.values(n, HELDOUT)))
        d = t.diff(best[6.0], rival, HELDOUT)
        out["p6_best"] = d
        text.append(f"- 6th order is the best configuration: best p = 6 minus the best other ({rival}): {diff_text(d)}")
    text.append("- The best lambda per p is picked on the same seeds it is scored on (optimistic for every p alike).")
    return "\n".join(text) + "\n", out


def claim_c3(t: Table) -> tuple[str, dict]:
    am_name = k_name(4)
    names = [am_name, k_name(1), k_name(N_STEPS), "DRaFT-1", "ReFL-4"]
    text = ["## C3: AM keeps diversity and the base distribution better than DRaFT-1 and ReFL, which gain slightly "
            "more reward (Tables 3, 4)\n", results_table(t, names)]
    out: dict[str, Any] = {}
    for rival in ("DRaFT-1", "ReFL-4"):
        if not (t.has(rival) and t.has(am_name)):
            continue
        for label, key, sign in (("1-SSIM", "diversity/ssim", 1), ("feature distance", "diversity/feature_distance", 1),
                                 ("recall", "recall", 1), ("coverage", "coverage", 1),
                                 ("trained reward (rival higher)", TRAINED, -1),
                                 ("held-out reward (rival higher)", HELDOUT, -1)):
            d = t.diff(am_name, rival, key, sign)
            out[f"{rival}:{label}"] = d
            text.append(f"- AM-4 vs {rival}, {label}: {diff_text(d)}")
    return "\n".join(text) + "\n", out


def claim_c4(profiles: list[dict[str, Any]]) -> tuple[str, dict]:
    text = ["## C4: the control intensity peaks late, at t* = 1/(1+s^2) for the Gaussian, flatter for larger p "
            "(Appendix C, Figure 9)\n",
            "One probe of the base per seed (64 samples, lambda = 10): |u*| per sampling step, normalised by its "
            "maximum; s^2 is the base samples' mean per-dimension variance (the Gaussian stand-in).\n",
            "| seed | s^2 | Gaussian t* | peak t (p=2) | peak t (p=4) | peak t (p=6) | flatness p=2 | p=4 | p=6 |",
            "|---|---|---|---|---|---|---|---|---|"]
    for i, prof in enumerate(profiles):
        text.append(
            f"| {i} | {prof['data_variance']:.3f} | {prof['predicted_peak']:.3f} | "
            + " | ".join(f"{prof[f'p{p}']['peak_time']:.3f}" for p in (2, 4, 6)) + " | "
            + " | ".join(f"{prof[f'p{p}']['flatness']:.3f}" for p in (2, 4, 6)) + " |")
    late = [prof["p2"]["peak_time"] >= 0.5 for prof in profiles]
    flatter = [prof["p2"]["flatness"] < prof["p4"]["flatness"] < prof["p6"]["flatness"] for prof in profiles]
    same_peak = [len({prof[f"p{p}"]["peak_time"] for p in (2, 4, 6)}) == 1 for prof in profiles]
    out = {
        "late": unanimous(late),
        "flatter": unanimous(flatter),
        "same_peak": all(same_peak),
        "peak_error": [prof["p2"]["peak_time"] - prof["predicted_peak"] for prof in profiles],
    }
    text.append("")
    text.append(f"- Peaks in the second half (t >= 0.5) in every seed: **{out['late']}**; the peak sits "
                f"{fmt(*mean_sd(out['peak_error']), digits=3)} from the Gaussian t* (flatness = mean / max).")
    text.append(f"- Flatter for larger p (flatness p=2 < p=4 < p=6 in every seed): **{out['flatter']}**; the same "
                f"peak step for every p in every seed: {out['same_peak']} (per sample |u*| = |a~|^(1/(p-1)) peaks "
                "where |a~| does, but the batch mean of |a~|^(1/(p-1)) can peak elsewhere when the profile is flat).")
    text.append("- On the Gaussian toy itself (s = 0.5) the probe equals the exact Euler lean adjoint and its energy "
                "peaks at the step holding t* = 0.8 (tests/test_probe.py).")
    return "\n".join(text) + "\n", out


def claim_c5(t: Table) -> tuple[str, dict]:
    names = [k_name(4), "SDE-AM-4 memoryless lambda=10", "SDE-AM-4 memoryless lambda~10", "SDE-AM-4 constant lambda~10"]
    text = ["## C5: ODE-AM vs SDE-AM (memoryless, constant) under the same budget (Section 4.1, Appendix D)\n",
            "Same K = 4, updates, batch and learning rate; lambda~10: matched to ODE-AM's control size at "
            "lambda = 10.\n",
            results_table(t, names)]
    out: dict[str, Any] = {}
    ode = k_name(4)
    for rival in names[1:]:
        if t.has(rival) and t.has(ode):
            d = t.diff(ode, rival, HELDOUT)
            out[f"ode_vs:{rival}"] = d
            text.append(f"- ODE-AM-4 minus {rival}, held-out reward: {diff_text(d)}")
    a, b = "SDE-AM-4 constant lambda~10", "SDE-AM-4 memoryless lambda~10"
    if t.has(a) and t.has(b):
        d = t.diff(a, b, HELDOUT)
        out["constant_vs_memoryless"] = d
        text.append(f"- another schedule does better than memoryless in practice (Appendix B.3): constant minus "
                    f"memoryless: {diff_text(d)}")
    return "\n".join(text) + "\n", out


def claim_auto(t: Table) -> tuple[str, dict]:
    auto = AUTO
    ks = [k for k in K_SWEEP if t.has(k_name(k))]
    text = ["## Adaptive truncation (`--truncate_steps auto`) vs the best fixed K at equal wall time\n",
            "Share 0.3 of the control energy, a probe every 10 updates (its time counts in s/update).\n",
            results_table(t, [auto] + [k_name(k) for k in ks])]
    out: dict[str, Any] = {}
    if not t.has(auto) or len(ks) < 2:
        return "\n".join(text) + "\n", out
    diffs = []
    for s in t.seeds:
        pts = sorted((t.seconds(k_name(k), s), t.metric(k_name(k), HELDOUT, s)) for k in ks)
        x = t.seconds(auto, s)
        diffs.append(t.metric(auto, HELDOUT, s) - _interp(pts, x))
    d = paired(diffs)
    out["vs_frontier"] = d
    text.append(f"- auto's held-out reward minus the fixed-K curve (linear in s/update) at auto's s/update: "
                f"{diff_text(d)}; 'holds' = auto beats the best fixed K at equal time, 'inconclusive' = on the curve.")
    return "\n".join(text) + "\n", out


def _interp(points: list[tuple[float, float]], x: float) -> float:
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return points[-1][1]


# -- plots ----------------------------------------------------------------------------------------------------
def plots(t: Table, profiles: list[dict[str, Any]], folder: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    ks = [k for k in K_SWEEP if t.has(k_name(k))]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((ax1, "gain", "held-out reward gain"), (ax2, "seconds_per_update", "s / update")):
        stats = [mean_sd(t.values(k_name(k), key)) if not (key == "seconds_per_update" and t.timing)
                 else (t.timing[k_name(k)], float("nan")) for k in ks]
        ax.errorbar(ks, [m for m, _ in stats], yerr=[0 if not math.isfinite(s) else s for _, s in stats],
                    marker="o", capsize=3, label="fixed K")
        auto = AUTO
        if t.has(auto):
            m, s = (mean_sd(t.values(auto, key)) if not (key == "seconds_per_update" and t.timing)
                    else (t.timing[auto], float("nan")))
            ax.errorbar([statistics.mean(t.values(auto, "k_mean"))], [m], yerr=[0 if not math.isfinite(s) else s],
                        marker="*", markersize=12, capsize=3, linestyle="none", label="auto (mean K)")
        ax.set_xlabel(f"K (of N = {N_STEPS})")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("C1: ODE-AM-K, p = 2, lambda = 10 (mean ± std over seeds)")
    fig.tight_layout()
    names.append(f"{stem}_k.png")
    fig.savefig(folder / names[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for run in t.runs:
        x, xs = mean_sd(t.values(run.name, "diversity/ssim"))
        y, ys = mean_sd(t.values(run.name, HELDOUT))
        marker = {"K": "o", "p": "s", "baseline": "X", "sde": "^", "auto": "*"}[run.group]
        ax.errorbar([x], [y], xerr=[0 if not math.isfinite(xs) else xs], yerr=[0 if not math.isfinite(ys) else ys],
                    marker=marker, linestyle="none", capsize=2, label=run.name)
    bx, _ = mean_sd([t.evals[s]["base"]["diversity/ssim"] for s in t.seeds])
    by, _ = mean_sd([t.evals[s]["base"][HELDOUT] for s in t.seeds])
    ax.plot([bx], [by], "kD", label="base")
    ax.set_xlabel("within-class diversity (1 - SSIM, 3 px window)")
    ax.set_ylabel("held-out reward")
    ax.set_title("Reward vs diversity per configuration")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    names.append(f"{stem}_frontier.png")
    fig.savefig(folder / names[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    times = profiles[0]["times"]
    for p, color in ((2, "C0"), (4, "C1"), (6, "C2")):
        curves = torch.tensor([prof[f"p{p}"]["intensity"] for prof in profiles])
        ax.plot(times, curves.mean(0).tolist(), color=color, marker="o", label=f"digits probe, p = {p}")
        ax.plot(times, profiles[0][f"p{p}"]["gaussian"], color=color, linestyle="--",
                label=f"Gaussian (s^2 = {profiles[0]['data_variance']:.2f}), p = {p}")
    ax.axvline(profiles[0]["predicted_peak"], color="gray", linestyle=":", label="Gaussian t* = 1/(1+s^2)")
    ax.set_xlabel("paper time t (0 noise, 1 data)")
    ax.set_ylabel("|u*| / max")
    ax.set_title("C4: control intensity per step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    names.append(f"{stem}_profile.png")
    fig.savefig(folder / names[-1], dpi=100)
    plt.close(fig)
    return names


# -- main --------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every configuration")
    p.add_argument("--max_train_steps", type=int, default=100, help="updates per run")
    p.add_argument("--num_images_per_prompt", type=int, default=20, help="evaluation images per class (10 classes)")
    p.add_argument("--workers", type=int, default=2, help="trainings at a time (one torch thread each)")
    p.add_argument("--timing_updates", type=int, default=20,
                   help="updates of the timing pass (the K sweep and auto, one run at a time; 0: none)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 7 configurations, 1 seed, 3 updates, 2 images per class (verdicts inconclusive)")
    p.add_argument("--work_dir", default=None, help="where the runs go (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true",
                   help="read the runs already finished in --work_dir instead of training them again")
    p.add_argument("--output", default=None, help="write the markdown report here (plots beside it)")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.max_train_steps, args.num_images_per_prompt = args.seeds[:1], 3, 2
        args.timing_updates = min(args.timing_updates, 2)
    from diffusers_am.checks import int_at_least, positive_int

    try:
        int_at_least(args.timing_updates, "--timing_updates", 0)
        for name in ("max_train_steps", "num_images_per_prompt", "workers"):
            positive_int(getattr(args, name), f"--{name}")
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    runs = [r for r in all_runs() if not args.quick or r.name in QUICK]
    start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="paper_claims_") if args.work_dir is None else None
    work = Path(args.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{len(runs)} configurations x {len(args.seeds)} seeds x {args.max_train_steps} updates", flush=True)
    trained = train_all(runs, args.seeds, work, args.max_train_steps, args.workers, args.reuse)
    timing = timing_pass(runs, work, args.timing_updates, args.reuse) if args.timing_updates else {}
    train_seconds = time.perf_counter() - start
    reused = sum(v["wall_seconds"] is None for v in trained.values())
    evals = {s: evaluate_seed(runs, s, work, args.num_images_per_prompt) for s in args.seeds}
    profiles = [control_profiles(s) for s in args.seeds]
    table = Table(runs, list(args.seeds), trained, evals, timing)
    sections, verdicts = [], {}
    for key, claim in (("C1", claim_c1), ("C2", claim_c2), ("C3", claim_c3), ("C5", claim_c5), ("auto", claim_auto)):
        text, verdicts[key] = claim(table)
        sections.append(text)
    text, verdicts["C4"] = claim_c4(profiles)
    sections.insert(3, text)
    total = time.perf_counter() - start
    out_md = Path(args.output) if args.output else None
    if out_md:
        out_md.parent.mkdir(parents=True, exist_ok=True)
    pngs = plots(table, profiles, out_md.parent, out_md.stem.lower()) if out_md else []
    cmd = "python benchmarks/paper_claims.py " + " ".join(shlex.quote(a) for a in argv)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        "# The paper's claims on the digits testbed, with seeds\n\n"
        f"```bash\n{cmd.strip()}\n```\n\n"
        f"- date {now}; {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}; "
        f"{len(runs)} configurations x seeds {args.seeds} x {args.max_train_steps} updates, {args.workers} "
        f"trainings at a time with one thread each (s/update is measured so, with that much CPU contention); "
        f"training {train_seconds / 60:.1f} min"
        + (f" ({reused} runs read from an earlier invocation with --reuse)" if reused else "")
        + f", whole script {total / 60:.1f} min\n"
        f"- every run: the trainer's defaults on the embedded digits base (N = {N_STEPS}, batch 16, LoRA rank 8, "
        f"lr 3e-3) unless the config says otherwise; evaluation: 10 classes x {args.num_images_per_prompt} images "
        "per model and seed, the same noise for every model of a seed; rewards are log p(class | image) (<= 0), "
        "gain = held-out reward minus the base's\n"
        "- values are mean ± std over seeds; verdicts use paired per-seed differences (holds: > 2 standard errors "
        "in the claimed direction; does not hold here: > 2 SE against it; else inconclusive)\n"
        "- LPIPS and 1 - MS-SSIM (the paper's diversity metrics) need images far larger than 8 x 8: the diversity "
        "columns are 1 - SSIM with a 3 px window and the held-out classifier's feature distance instead\n\n"
    )
    plots_md = "".join(f"![{name}]({name})\n\n" for name in pngs)
    report = header + plots_md + "\n".join(sections)
    print(report)
    if out_md:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        out_md.write_text(report)
    result = {"verdicts": verdicts, "timing": timing, "evals": evals,
              "train": {f"{k[0]}|{k[1]}": v for k, v in trained.items()},
              "profiles": profiles, "total_seconds": total, "seeds": args.seeds, "runs": [r.name for r in runs]}
    if args.json:
        from diffusers_am.jsonio import dumps

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(dumps(result, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
