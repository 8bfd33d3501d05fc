"""The mutation suite: plausible bugs put into a temporary copy of the repository, one at a time; each must
make its test selection fail.

Each mutant names an exact snippet of ``diffusers_am/**/*.py`` (``old``) and its replacement (``new``). The
snippet is searched in every package file, not at a path or line, so the catalogue survives modules being
moved or renamed; it must occur exactly once in the whole package, else the tool stops naming the mutant
(update the snippet to the code as it now is). The suite runs in a temporary copy of the repository (the
working tree is never edited): first the union of all selections on the unmutated copy (it must pass), then
per mutant: apply, ``python -m pytest -x`` on its selection, restore.

    python tools/mutants.py                 # every mutant (make mutants)
    python tools/mutants.py --list          # the table: mutant, area, tests
    python tools/mutants.py adjoint-sign    # only the named mutants (or areas)
    python tools/mutants.py --check         # only verify that every snippet occurs exactly once

A mutant is caught when pytest reports a failing test (exit status 1). A surviving mutant, a selection that
errors or collects nothing, or a run over ``--timeout`` seconds makes the tool exit with status 1; the table
it prints says which. Run time: see README's contributor section.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "diffusers_am"
NOT_COPIED = {".git", ".venv", "outputs", "build", "dist", ".pytest_cache", "__pycache__"}
"""Top-level entries left out of the temporary copy (tests read scripts/, examples/, benchmarks/ too)."""


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    bug: str
    old: str
    new: str
    tests: tuple[str, ...]


T_ADJ = "tests/test_adjoint.py"
T_CTRL = "tests/test_control.py"
T_OBJ = "tests/test_objectives.py"
T_SDE = "tests/test_sde_am.py"
T_VJP = "tests/test_base_vjp.py"
T_TRUNC = "tests/test_truncation.py"
T_CAL = "tests/test_calibration.py"
T_CLIP = "tests/test_rewards_clip.py"
T_PRE = "tests/test_rewards_preprocess.py"
T_IR = "tests/test_rewards_imagereward.py"
T_GC = "tests/test_gradient_checkpointing.py"
T_RUN = "tests/test_trainer_run.py"
T_MICRO = "tests/test_micro_batch.py"
T_ADAPT = "tests/test_adaptive_training.py"

MUTANTS: tuple[Mutant, ...] = (
    # -- the lean adjoint ----------------------------------------------------------------------------
    Mutant(
        "adjoint-sign", "adjoint", "the adjoint steps backward with the wrong sign of dt J^T a",
        "a = a + dt * jt_a.to(a.dtype)", "a = a - dt * jt_a.to(a.dtype)",
        (T_ADJ,),
    ),
    Mutant(
        "adjoint-state-off-by-one", "adjoint", "the VJP at step k taken at X_{k+1}, t_{k+1}",
        "v, jt_a = base_vjp(states[k], times[k], a)", "v, jt_a = base_vjp(states[k + 1], times[k + 1], a)",
        (T_ADJ,),
    ),
    # -- the optimal control --------------------------------------------------------------------------
    Mutant(
        "control-sign-p2", "control", "phi_2(a) = +a instead of -a",
        "    if p == 2.0:\n        return -adjoint", "    if p == 2.0:\n        return adjoint",
        (T_CTRL,),
    ),
    Mutant(
        "control-exponent", "control", "|phi_p(a)| = |a|^((2-p)/(p-1)) instead of |a|^(1/(p-1))",
        "safe.pow(1.0 / (p - 1.0))", "safe.pow((2.0 - p) / (p - 1.0))",
        (T_CTRL,),
    ),
    Mutant(
        "control-cost-no-1/p", "control", "the running cost |u|^p without its 1/p",
        "return per_sample_norm(u).pow(p) / p", "return per_sample_norm(u).pow(p)",
        (T_CTRL,),
    ),
    # -- objectives -------------------------------------------------------------------------------------
    Mutant(
        "ode-am-target-off-by-one", "objectives", "ODE-AM regresses step k onto a~_{k+1}",
        "adj = window.adjoints[:-1]\n        targets = optimal_control(", "adj = window.adjoints[1:]\n        targets = optimal_control(",
        (T_OBJ,),
    ),
    Mutant(
        "ode-am-terminal-sign", "objectives", "ODE-AM's terminal adjoint +lambda grad r (ascends -r)",
        "window = lean_adjoint_window(part.base_vjp, xs, window_times, -reward_scale * grad_r)",
        "window = lean_adjoint_window(part.base_vjp, xs, window_times, reward_scale * grad_r)",
        (T_OBJ,),
    ),
    Mutant(
        "sde-am-target-off-by-one", "objectives", "SDE-AM regresses step k onto -sigma a~_{k+1}",
        "matching_loss(u, -sigma * window.adjoints[k], loss_reduction)",
        "matching_loss(u, -sigma * window.adjoints[k + 1], loss_reduction)",
        (T_SDE, T_OBJ),
    ),
    Mutant(
        "draft-loss-sign", "objectives", "DRaFT / ReFL minimise +lambda r",
        "loss = _scaled(-(reward_scale * upcast(reward)).mean(), share)",
        "loss = _scaled((reward_scale * upcast(reward)).mean(), share)",
        (T_OBJ,),
    ),
    Mutant(
        "refl-prediction", "objectives", "ReFL's one-step prediction x_j + t_j v instead of x_j + (1 - t_j) v",
        "x1 = x + (1.0 - upcast(t)) * upcast(v)", "x1 = x + upcast(t) * upcast(v)",
        (T_OBJ,),
    ),
    # -- noise schedules ----------------------------------------------------------------------------------
    Mutant(
        "drift-vjp-state-sign", "schedules", "J^T a of the SDE drift adds state_coeff * a instead of subtracting",
        "return self.drift(x, upcast(v), t), jt - self.state_coeff(t) * cotangent",
        "return self.drift(x, upcast(v), t), jt + self.state_coeff(t) * cotangent",
        (T_OBJ, T_SDE),
    ),
    Mutant(
        "velocity-gain-no-t", "schedules", "the general velocity gain 1 + sigma^2 / (2 (1 - t)) (t dropped)",
        "return 1.0 + self.sigma2(t) * t / (2.0 * (1.0 - t))", "return 1.0 + self.sigma2(t) / (2.0 * (1.0 - t))",
        (T_OBJ, T_SDE),
    ),
    Mutant(
        "memoryless-state-coeff", "schedules", "the memoryless drift's state term -x / t^2 instead of -x / t",
        "return self.scale / self.clip(t)", "return self.scale / self.clip(t) ** 2",
        (T_SDE, T_OBJ),
    ),
    # -- each family's base velocity and VJP -------------------------------------------------------------------
    Mutant(
        "flowmatch-base-vjp-lora-on", "base VJP (FLUX.2-klein, FLUX.1, SD3)",
        "the FlowMatch base VJP computed with the LoRA switched on",
        "forward and backward with the LoRA disabled.\"\"\"\n        with self.adapter.adapters_disabled():\n"
        "            return vjp_velocity(self._base, x, t, cotangent)\n\n    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:\n"
        "        \"\"\"v_theta(x, t) [B, C, h, w]",
        "forward and backward with the LoRA disabled.\"\"\"\n        if True:\n"
        "            return vjp_velocity(self._base, x, t, cotangent)\n\n    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:\n"
        "        \"\"\"v_theta(x, t) [B, C, h, w]",
        (T_VJP,),
    ),
    Mutant(
        "sit-base-vjp-lora-on", "base VJP (SiT)", "the SiT base VJP computed with the LoRA switched on",
        "        self._check(x)\n        with self.adapter.adapters_disabled():\n            return vjp_velocity(self._base, x, t, cotangent)",
        "        self._check(x)\n        if True:\n            return vjp_velocity(self._base, x, t, cotangent)",
        (T_VJP,),
    ),
    Mutant(
        "flux2-timestep-scale", "base VJP (FLUX.2-klein)", "FLUX.2 transformer given sigma * 1000 as its timestep",
        "# the pipeline passes timestep = sigma * 1000 in the latents' dtype, divided by 1000\n"
        "        timestep = (sigma.float() * 1000).expand(b).to(dtype) / 1000",
        "# the pipeline passes timestep = sigma * 1000 in the latents' dtype, divided by 1000\n"
        "        timestep = (sigma.float() * 1000).expand(b).to(dtype)",
        ("tests/test_flux2.py::test_base_trajectory_equals_stock_pipeline", T_VJP),
    ),
    Mutant(
        "flux-guidance-ignored", "base VJP (FLUX.1)", "FLUX.1's guidance embedding always fed the default 3.5",
        "guidance = torch.full([b], self.resolve_guidance(guidance_scale), device=x.device, dtype=torch.float32)",
        "guidance = torch.full([b], self.resolve_guidance(None), device=x.device, dtype=torch.float32)",
        ("tests/test_flux.py",),
    ),
    Mutant(
        "sd3-timestep-in-paper-time", "base VJP (SD3)", "SD3 transformer given (1 - sigma) * 1000 as its timestep",
        "timestep = (sigma.float() * self.pipeline.scheduler.config.num_train_timesteps)",
        "timestep = ((1.0 - sigma.float()) * self.pipeline.scheduler.config.num_train_timesteps)",
        ("tests/test_sd3.py",),
    ),
    Mutant(
        "flowmatch-velocity-sign", "base VJP (FLUX.2-klein, FLUX.1, SD3)", "paper-time velocity +v_model instead of -v_model",
        "return -self.adapter._predict(module, x, sigma, self.encoded, self.guidance_scale).float()",
        "return self.adapter._predict(module, x, sigma, self.encoded, self.guidance_scale).float()",
        ("tests/test_flux2.py::test_base_trajectory_equals_stock_pipeline",),
    ),
    Mutant(
        "sit-cfg-around-cond", "base VJP (SiT)", "SiT's classifier-free guidance extrapolated from v_cond, not v_null",
        "guided = v_null + guidance_scale * (v_cond - v_null)", "guided = v_cond + guidance_scale * (v_cond - v_null)",
        ("tests/test_sit.py::test_pipeline_cfg_combines_conditional_and_null_velocities",),
    ),
    # -- the adaptive window ---------------------------------------------------------------------------------
    Mutant(
        "window-counts-from-the-start", "adaptive window", "the window's energy summed from the first step, not the last",
        "tail = torch.cumsum(torch.flip(e, [0]), 0)", "tail = torch.cumsum(e, 0)",
        (T_TRUNC,),
    ),
    Mutant(
        "window-smoothing-swapped", "adaptive window", "the profile EMA weights the newest probe by the smoothing",
        "share = self.smoothing * self.profile + (1.0 - self.smoothing) * share",
        "share = (1.0 - self.smoothing) * self.profile + self.smoothing * share",
        (T_TRUNC,),
    ),
    Mutant(
        "window-refresh-off-by-one", "adaptive window", "the probe refreshed one update late",
        "update - self.last_probe >= self.refresh_every", "update - self.last_probe > self.refresh_every",
        (T_TRUNC,),
    ),
    Mutant(
        "energy-power-always-2", "adaptive window", "the per-step control energy dt |u*|^2 whatever the order p",
        "power = self.order if self.sigma is None else 2.0", "power = 2.0",
        (T_TRUNC, "tests/test_probe.py"),
    ),
    # -- the matched lambda ------------------------------------------------------------------------------
    Mutant(
        "matched-lambda-exponent", "matched lambda", "the size ratio raised to the exponent instead of its inverse",
        "(math.log(ref_size) - math.log(probe_size)) / target.scale_exponent",
        "(math.log(ref_size) - math.log(probe_size)) * target.scale_exponent",
        (T_CAL,),
    ),
    Mutant(
        "velocity-statistic-unweighted", "matched lambda", "the velocity statistic averaged over steps without dt",
        "return ((dt[:, None] * sq).sum(0) / dt.sum()).sqrt()", "return sq.mean(0).sqrt()",
        (f"{T_CAL}::test_velocity_statistic_is_the_time_weighted_rms_over_the_window",),
    ),
    # -- rewards -----------------------------------------------------------------------------------------
    Mutant(
        "clipscore-without-100", "rewards", "CLIPScore without its x100",
        "def __init__(self, embedder: ClipEmbedder, weight: float = 100.0):",
        "def __init__(self, embedder: ClipEmbedder, weight: float = 1.0):",
        (f"{T_CLIP}::test_clipscore_is_100_cos_of_the_stock_clip_model",),
    ),
    Mutant(
        "pickscore-logit-scale-not-exp", "rewards", "PickScore scaled by logit_scale, not exp(logit_scale)",
        "scale = self.embedder.model.logit_scale.float().exp()", "scale = self.embedder.model.logit_scale.float()",
        (f"{T_CLIP}::test_pickscore_is_exp_logit_scale_cos_of_the_stock_clip_model",),
    ),
    Mutant(
        "resize-without-antialias", "rewards", "the CLIP / HPSv2 resize without antialias (not PIL's kernel)",
        'mode="bicubic", align_corners=False, antialias=True)', 'mode="bicubic", align_corners=False, antialias=False)',
        (T_PRE,),
    ),
    Mutant(
        "imagereward-unnormalised", "rewards", "ImageReward without its (raw - mean) / std",
        "return (raw - REWARD_MEAN) / REWARD_STD", "return raw",
        (T_IR,),
    ),
    # -- training: micro-batching, accumulation, EMA, checkpointing, resume -------------------------------------
    Mutant(
        "micro-batch-share-dropped", "micro-batching", "each micro-batch's loss not scaled by its share of the batch",
        "return loss if share == 1.0 else loss * share", "return loss",
        (f"{T_MICRO}::test_micro_batches_give_the_whole_batch_gradient",),
    ),
    Mutant(
        "ema-decay-inverted", "EMA", "the EMA built with 1 - decay",
        "EMAModel(full_tensors(params), decay=cfg.ema_decay)", "EMAModel(full_tensors(params), decay=1.0 - cfg.ema_decay)",
        (f"{T_RUN}::test_ema_adapter_is_the_ema_of_the_updates",),
    ),
    Mutant(
        "checkpointing-rng-not-preserved", "gradient checkpointing",
        "checkpointed blocks recompute without restoring the RNG (LoRA dropout differs in the backward)",
        "            model.transformer.enable_gradient_checkpointing()",
        "            model.transformer.enable_gradient_checkpointing(__import__('functools').partial("
        "__import__('torch').utils.checkpoint.checkpoint, use_reentrant=False, preserve_rng_state=False))",
        (f"{T_GC}::test_checkpointing_with_lora_dropout_gives_the_plain_adapter",),
    ),
    Mutant(
        "resume-rng-not-restored", "resume", "a resumed run does not restore the torch RNG (LoRA dropout)",
        'torch.set_rng_state(states["torch"])', "pass",
        (f"{T_RUN}::test_resume_two_plus_two_equals_four",),
    ),
    Mutant(
        "resume-optimizer-not-restored", "resume", "a resumed run starts Adam's moments afresh",
        "                obj.load_state_dict(state[name])",
        "                obj.load_state_dict(state[name]) if name != 'optimizer' else None",
        (f"{T_RUN}::test_resume_two_plus_two_equals_four",),
    ),
)


def package_files(root: Path) -> list[Path]:
    return sorted((root / PACKAGE).rglob("*.py"))


def locate(mutant: Mutant, root: Path) -> Path:
    """The one package file holding ``mutant.old`` exactly once; SystemExit naming the mutant otherwise."""
    hits = [(p, p.read_text(encoding="utf-8").count(mutant.old)) for p in package_files(root)]
    hits = [(p, n) for p, n in hits if n]
    total = sum(n for _, n in hits)
    if total != 1:
        where = ", ".join(f"{p.relative_to(root)} x{n}" for p, n in hits) or "nowhere"
        raise SystemExit(
            f"mutant {mutant.name!r}: its snippet occurs {total} times in {PACKAGE}/ ({where}), it must occur exactly "
            f"once: update `old` in tools/mutants.py to the code as it is now.\n--- snippet ---\n{mutant.old}"
        )
    return hits[0][0]


def check_catalogue(mutants: tuple[Mutant, ...], root: Path = ROOT) -> None:
    names = [m.name for m in mutants]
    if len(set(names)) != len(names):
        raise SystemExit("tools/mutants.py: two mutants share a name")
    for m in mutants:
        if m.old == m.new:
            raise SystemExit(f"mutant {m.name!r}: `new` equals `old`")
        locate(m, root)
        for test in m.tests:
            if not (root / test.split("::")[0]).is_file():
                raise SystemExit(f"mutant {m.name!r}: test file {test!r} does not exist")


def copy_repo(dest: Path) -> None:
    for src in sorted(ROOT.iterdir()):
        if src.name in NOT_COPIED or src.name.endswith(".egg-info"):
            continue
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dest / src.name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / src.name, follow_symlinks=False)


def pytest(copy: Path, tests: tuple[str, ...] | list[str], timeout: float) -> tuple[int | None, float, str]:
    """(exit status or None on timeout, seconds, last lines of output) of ``pytest -x`` on ``tests`` in ``copy``."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - start, ""
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return proc.returncode, time.perf_counter() - start, tail


def check_imports_copy(copy: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(copy))
    out = subprocess.run(
        [sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"], cwd=copy, env=env,
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy imports {PACKAGE} from {out}, not from {copy}: the mutants would not be tested")


def select(names: list[str]) -> tuple[Mutant, ...]:
    if not names:
        return MUTANTS
    chosen = tuple(m for m in MUTANTS if m.name in names or m.area in names)
    unknown = set(names) - {m.name for m in chosen} - {m.area for m in chosen}
    if unknown:
        raise SystemExit(f"unknown mutant or area: {', '.join(sorted(unknown))}; see --list")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mutants", nargs="*", help="mutant names or areas (default: all)")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--check", action="store_true", help="only check that every snippet occurs exactly once")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selections")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    args = parser.parse_args(argv)
    mutants = select(args.mutants)
    check_catalogue(MUTANTS)
    if args.list:
        for m in mutants:
            print(f"{m.name:34s} {m.area:40s} {' '.join(m.tests)}")
        return 0
    if args.check:
        print(f"{len(MUTANTS)} mutants: every snippet occurs exactly once in {PACKAGE}/")
        return 0

    started = time.perf_counter()
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        check_imports_copy(copy)
        if not args.no_baseline:
            selection = sorted({t for m in mutants for t in m.tests})
            rc, seconds, tail = pytest(copy, selection, args.timeout * 4)
            print(f"baseline (unmutated): {'pass' if rc == 0 else 'FAIL'} in {seconds:.0f} s", flush=True)
            if rc != 0:
                print(tail)
                return 1
        for m in mutants:
            path = locate(m, copy)
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(m.old, m.new), encoding="utf-8")
            try:
                rc, seconds, tail = pytest(copy, m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            verdict = {1: "caught", 0: "SURVIVED", None: "TIMEOUT"}.get(rc, f"ERROR (pytest exit {rc})")
            failed |= verdict != "caught"
            first = next((line for line in tail.splitlines() if line.startswith("FAILED")), "")
            rows.append((m, verdict, seconds, first))
            print(f"{m.name:34s} {verdict:10s} {seconds:6.1f} s  {first[:110]}", flush=True)
            if verdict.startswith("ERROR"):
                print(tail)
    total = time.perf_counter() - started
    caught = sum(v == "caught" for _, v, _, _ in rows)
    print(f"\n{caught}/{len(rows)} mutants caught in {total:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
