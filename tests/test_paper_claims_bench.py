"""benchmarks/paper_claims.py: the run list, the verdicts and the generated report on a synthetic work dir (values
chosen so every verdict is known by hand), 1 - MS-SSIM at 32 px, and one tiny real train + report."""

import json
import math
from pathlib import Path

import pytest
import torch
from _scripts import load_script


def load_bench():
    return load_script("benchmarks/paper_claims.py", "paper_claims")


def test_run_list():
    bench = load_bench()
    runs = bench.all_runs(100)
    assert len({r.slug for r in runs}) == len({r.name for r in runs}) == len(runs)
    names = {r.name for r in runs}
    for name in ("ODE-AM-4 p=2 lambda=10", "ODE-AM-Full p=2 lambda=10", "ODE-AM-Full p=6 lambda~10",
                 "DRaFT-1 10 updates", "ReFL-5 100 updates", "SDE-AM-4 constant lambda=10",
                 "ODE-AM-auto p=2 lambda=10"):
        assert name in names
    assert {r.tier for r in runs if r.name in ("ODE-AM-4 p=2 lambda=10", "ODE-AM-Full p=2 lambda=10")} == {1}
    budgets = {r.name: r.steps for r in runs if r.family == "draft"}
    assert budgets == {"DRaFT-1 10 updates": 10, "DRaFT-1 25 updates": 25, "DRaFT-1 50 updates": 50,
                       "DRaFT-1 100 updates": None}  # None: the run's own --max_train_steps
    assert {r.steps for r in bench.all_runs(3) if r.family == "draft"} == {1, 2, None}  # budgets scale


def _fake_run(folder: Path, updates: int, lam: float, seconds: float, k: int = 4) -> None:
    folder.mkdir(parents=True)
    (folder / "train_summary.json").write_text(json.dumps({"reward_scale": lam}))
    (folder / "train_log.jsonl").write_text(
        "".join(json.dumps({"seconds": seconds, "truncate_steps": k}) + "\n" for _ in range(updates)))
    (folder / "claims_wall_seconds.json").write_text(json.dumps({"wall_seconds": seconds * updates}))


def _write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


SEEDS = range(6)
JUDGE = "reward/digits-heldout"


def _synthetic_work(bench, work: Path, with_auto: bool = False, with_sde: bool = False) -> dict:
    """AM-4 beats AM-Full by 0.01 (+- 0.002 by seed); the p = 2 lambda curve at K = 4 has reward
    -0.10 + 0.01 * i and 1-SSIM 0.40 - 0.02 * i at its i-th lambda (i = 0 at lambda 2.5, -2 at 0.625); DRaFT-1
    (100 updates) sits at reward -0.065 with 1-SSIM 0.20; learned control energies rise linearly (k + 1) for
    p = 2 and are flat for p = 6."""
    bed = bench.TESTBEDS["digits"]
    runs = {r.name: r for r in bench.all_runs(100)}
    grid = [n for n in runs if n.startswith("ODE-AM-4 p=2 lambda=") and runs[n].tier != 5]  # no extension run
    grid.sort(key=lambda n: runs[n].lam)
    for s in SEEDS:
        jitter = 0.002 * (s % 3 - 1)
        evals = {"base": {JUDGE: -0.2}}
        for i, name in enumerate(grid, start=-grid.index("ODE-AM-4 p=2 lambda=2.5")):
            evals[name] = {JUDGE: -0.10 + 0.01 * i, "diversity/ssim": 0.40 - 0.02 * i, "recall": 1.0}
        lam10 = evals["ODE-AM-4 p=2 lambda=10"][JUDGE]
        evals["ODE-AM-Full p=2 lambda=10"] = {JUDGE: lam10 - 0.01 + jitter}
        evals["ODE-AM-Full p=6 lambda~10"] = {JUDGE: lam10}
        evals["DRaFT-1 100 updates"] = {JUDGE: -0.065, "diversity/ssim": 0.20, "recall": 0.5}
        evals["ODE-AM-4 p=2 lambda=10"]["reward/digits"] = 0.1  # the trained reward: DRaFT-1 above it by 0.02 + jitter
        evals["DRaFT-1 100 updates"]["reward/digits"] = 0.12 + jitter
        for p in (4, 6):  # 5 lambdas each: reward -0.075 + 0.01 i, 1-SSIM 0.43 - 0.02 i (p = 6 a little lower)
            for i, lam in enumerate((5, 10, 20, 40, 80)):
                evals[f"ODE-AM-4 p={p} lambda~{lam}"] = {
                    JUDGE: -0.075 + 0.01 * i - (0.002 * (1 + s % 2) if p == 6 else 0.0),
                    "diversity/ssim": 0.43 - 0.02 * i, "recall": 1.0}
        if with_sde:  # memoryless at its i-th lambda: reward -0.12 + 0.01 i + 0.001 (s % 2), recall 1 - 0.1 i;
            # sine (seeds 0-3 only): reward -0.095 + 0.01 i + jitter, recall 1 - 0.05 i
            for i, lam in enumerate(bench.SDE_LAMBDAS["memoryless"]):
                evals[f"SDE-AM-4 memoryless lambda={lam:g}"] = {JUDGE: -0.12 + 0.01 * i + 0.001 * (s % 2),
                                                               "recall": 1.0 - 0.1 * i}
            for i, lam in enumerate(bench.SDE_LAMBDAS["constant"]):  # below memoryless everywhere
                evals[f"SDE-AM-4 constant lambda={lam:g}"] = {JUDGE: -0.2 + 0.001 * i + jitter, "recall": 1.0}
            for i, lam in enumerate(bench.SDE_LAMBDAS["sine"]):
                if s < 4:
                    evals[f"SDE-AM-4 sine lambda={lam:g}"] = {JUDGE: -0.095 + 0.01 * i + jitter,
                                                             "recall": 1.0 - 0.05 * i}
        if with_auto:  # the rest of the K sweep and auto (reward -0.07 + 0.001 (s % 3 - 1))
            for k, r in ((1, -0.10), (2, -0.09), (8, -0.075), (12, -0.075)):
                evals[f"ODE-AM-{k} p=2 lambda=10"] = {JUDGE: r}
            evals["ODE-AM-auto p=2 lambda=10"] = {JUDGE: -0.07 + 0.001 * (s % 3 - 1)}
        for name, metrics in evals.items():
            slug = "base" if name == "base" else runs[name].slug
            _write(bench.eval_file(work, bed, s, slug), metrics)
            if name != "base":
                _fake_run(bench.run_dir(work, bed, runs[name], s), 100, runs[name].lam, 0.5)
        _write(bench.control_file(work, bed, s, runs["ODE-AM-Full p=2 lambda=10"].slug),
               {"energy": [float(k + 1) for k in range(20)]})
        _write(bench.control_file(work, bed, s, runs["ODE-AM-Full p=6 lambda~10"].slug),
               {"energy": [1.0 + 0.01 * ((k + s) % 3) for k in range(20)]})
    for rnd in range(3):  # AM-4 takes 0.4 s per update, AM-Full 1.0 s (+- 0.1 by round), auto 0.5 + 0.01 round
        times = {"ODE-AM-4 p=2 lambda=10": 0.4, "ODE-AM-Full p=2 lambda=10": 1.0 + 0.1 * (rnd - 1)}
        if with_auto:
            times.update({"ODE-AM-1 p=2 lambda=10": 0.2, "ODE-AM-2 p=2 lambda=10": 0.3, "ODE-AM-8 p=2 lambda=10": 0.6,
                          "ODE-AM-12 p=2 lambda=10": 0.8, "ODE-AM-auto p=2 lambda=10": 0.5 + 0.01 * rnd})
        for name, sec in times.items():
            _fake_run(work / "digits" / "timing" / f"round{rnd}" / runs[name].slug, 20, 10.0, sec)
    return {"grid": grid}


def test_report_verdicts_on_a_synthetic_work_dir(tmp_path):
    bench = load_bench()
    work = tmp_path / "work"
    info = _synthetic_work(bench, work)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{bench.README_BEGIN}\nSTALE\n{bench.README_END}\nafter\n")
    md, js = tmp_path / "CLAIMS.md", tmp_path / "claims.json"
    bench.main(["--phase", "report", "--seeds", *map(str, SEEDS), "--work_dir", str(work), "--reuse",
                "--timing_rounds", "3", "--output", str(md), "--json", str(js), "--readme", str(readme)])
    data = json.loads(js.read_text())
    tests = {t["label"]: t for t in data["testbeds"]["digits"]["analysis"]["tests"]}

    c1 = tests["AM-4 minus AM-Full, reward/digits-heldout (claim: >= 0; 'holds' = better, 'does not hold' = worse)"]
    diffs = [0.01 - 0.002 * (s % 3 - 1) for s in SEEDS]
    assert c1["diffs"] == pytest.approx(diffs) and c1["n"] == 6 and c1["df"] == 5
    assert c1["verdict"] == "holds" and c1["p_for_holm"] <= len(tests) * c1["p_for"] + 1e-12
    # non-inferiority: AM-4 - AM-Full + 10% of AM-Full's gain over the base (-0.2): AM-Full is -0.09 + jitter
    margin = tests["AM-4 minus AM-Full plus 10% of AM-Full's reward/digits-heldout gain over the base (claim: > 0, "
                   "non-inferior at that margin; 'does not hold' = short of AM-Full by more)"]
    assert margin["diffs"] == pytest.approx([d + 0.1 * (0.11 + 0.002 * (s % 3 - 1)) for d, s in zip(diffs, SEEDS)])
    assert margin["verdict"] == "holds"

    time = next(t for k, t in tests.items() if k.startswith("AM-4 time per update"))
    ratios = [0.4 / (1.0 + 0.1 * (r - 1)) for r in range(3)]
    assert time["diffs"] == pytest.approx([r - 1 for r in ratios]) and time["df"] == 2  # over timing rounds
    assert time["verdict"] == "holds"

    # C3 at matched reward: DRaFT's -0.065 lies between the grid's 3rd and 4th lambdas (-0.08 + 0.015 ...):
    # -0.065 = -0.10 + 0.01 * 3.5 -> AM's 1-SSIM there 0.40 - 0.02 * 3.5 = 0.33; minus DRaFT's 0.20 = 0.13
    c3 = tests["AM-4 at DRaFT-1 100 updates's held-out reward minus DRaFT-1 100 updates, diversity/ssim"]
    assert c3["diffs"] == pytest.approx([0.13] * 6) and c3["verdict"] == "holds"
    assert tests["AM-4 at DRaFT-1 100 updates's held-out reward minus DRaFT-1 100 updates, recall"]["mean"] == \
        pytest.approx(0.5)
    assert len(info["grid"]) == 9
    # "the rivals gain more reward" at the same 100 updates: on the held-out judge DRaFT's -0.065 vs AM-4 lambda
    # 10's -0.08; on the trained reward 0.12 + jitter vs 0.1
    same_budget = "DRaFT-1 100 updates minus AM-4 lambda=10 (same budget), {} (claim: rival higher)"
    assert tests[same_budget.format(JUDGE)]["diffs"] == pytest.approx([0.015] * 6)
    trained = tests[same_budget.format("reward/digits")]
    assert trained["diffs"] == pytest.approx([0.02 + 0.002 * (s % 3 - 1) for s in SEEDS])
    assert trained["verdict"] == "holds"

    # C4: energy k + 1: the last 4 of 20 steps hold (17+18+19+20) / 210; its peak is the last step
    late = tests["p=2 AM-Full: share of control energy in the last 4 of 20 steps minus the uniform 0.2"]
    assert late["mean"] == pytest.approx(74 / 210 - 0.2) and late["verdict"] == "holds"
    interior = tests["p=2 AM-Full: log(max energy before the last step / energy at the last step) (> 0: interior "
                     "peak)"]
    assert interior["mean"] == pytest.approx(math.log(19 / 20)) and interior["verdict"] == "does not hold"
    flatter = tests["p=6 minus p=2 (AM-Full): share of control energy in the first half of the steps"]
    assert flatter["verdict"] == "holds"  # p = 6's flat profile keeps about half in the first half, p = 2 55/210

    # C2: each order's best lambda (leave-one-out) is its top one: p = 4 at -0.035 vs p = 2 at -0.04
    c2 = tests["best p=4 minus best p=2 (lambda chosen leave-one-seed-out), reward/digits-heldout"]
    assert c2["diffs"] == pytest.approx([0.005] * 6) and c2["verdict"] == "holds"
    choice = data["testbeds"]["digits"]["analysis"]["claims"]["C2"]["choice"]
    assert set(choice["p2"].values()) == {"ODE-AM-4 p=2 lambda=160"}
    # frontier: p = 4's curve at p = 2's -0.04 is its i = 3.5 point: 1-SSIM 0.43 - 0.07 = 0.36, vs p = 2's 0.28
    front = tests["p=4 minus p=2 at p=2's held-out reward (its leave-one-out lambda), diversity/ssim"]
    assert front["diffs"] == pytest.approx([0.08] * 6) and front["verdict"] == "holds"
    p6 = tests["best p=6 minus the best of p=2 and p=4 (leave-one-seed-out), reward/digits-heldout"]
    assert p6["diffs"] == pytest.approx([-0.002 * (1 + s % 2) for s in SEEDS]) and p6["verdict"] == "does not hold"
    bracket = data["testbeds"]["digits"]["analysis"]["claims"]["C2"]["bracket"]["p2"]
    assert bracket[JUDGE]["bracketed"] is False and bracket[JUDGE]["monotone"] == "rises"  # -0.10 + 0.01 i
    assert bracket["recall"]["monotone"] is None  # recall 1.0 at every lambda: flat, neither
    # the grids' extensions (tier 5) have no finished run here: left out of C2, and said so
    assert data["testbeds"]["digits"]["analysis"]["claims"]["C2"]["not_finished_on_every_seed"] == [
        "ODE-AM-4 p=2 lambda=320", "ODE-AM-4 p=2 lambda=640", "ODE-AM-4 p=4 lambda~160", "ODE-AM-4 p=6 lambda~160"]

    sat = data["testbeds"]["digits"]["analysis"]["claims"]["C1"]["saturation"]
    assert sat["k"] is None and len(sat["pairs"]) == 1  # only K = 4 and AM-Full ran: no sweep to saturate
    assert "the smallest K that no larger K is significantly better than (two-sided paired t, Holm over the 1 pairs " \
        "of the K sweep): not decided (only 2 K of the sweep ran)" in md.read_text()
    prov = data["provenance"]
    assert prov["commit"] and "CPU cores" in prov["machine"] and prov["wall_seconds"] >= 0

    text = md.read_text()
    assert "### C1" in text and "**holds**" in text and "does not hold" in text
    assert "- p2: best mean reward/digits-heldout at ODE-AM-4 p=2 lambda=160 — NOT bracketed (a grid end); the mean " \
        "rises at every step of the grid (9 points)" in text
    assert f"{c1['mean']:.4f}" in text  # the report prints what the JSON holds
    part = readme.read_text()
    assert part.startswith("# x\n\nbefore\n") and part.endswith("after\n") and "STALE" not in part
    assert "| digits | C1: truncated AM-K" in part and "| **holds** | 3 / 0 / 0 | 6 |" in part  # time: n = rounds, not shown


def test_saturation_and_adaptive_truncation_on_a_synthetic_work_dir(tmp_path):
    bench = load_bench()
    work = tmp_path / "work"
    _synthetic_work(bench, work, with_auto=True)
    out = bench.main(["--phase", "report", "--seeds", *map(str, SEEDS), "--work_dir", str(work), "--reuse",
                      "--timing_rounds", "3"])
    analysis = out["testbeds"]["digits"]["analysis"]
    # K = 1, 2, 4, 8, 12: -0.10, -0.09, -0.08, -0.075, -0.075: K = 8 is where no larger K is better
    assert analysis["claims"]["C1"]["saturation"]["k"] == 8
    auto = analysis["claims"]["auto"]
    # the fixed-K curve at auto's 0.5 + 0.01 r s/update lies between K = 4 (0.4 s, -0.08) and K = 8 (0.6 s, -0.075):
    # -0.08 + 0.005 (0.1 + 0.01 r) / 0.2; auto's reward minus that, per round r = 0, 1, 2
    per_round = [-0.07 - (-0.08 + 0.005 * (0.1 + 0.01 * r) / 0.2) for r in range(3)]
    assert auto["over_rounds"]["diffs"] == pytest.approx(per_round) and auto["over_rounds"]["df"] == 2
    per_seed = [sum(per_round) / 3 + 0.001 * (s % 3 - 1) for s in SEEDS]
    assert auto["over_seeds"]["diffs"] == pytest.approx(per_seed) and auto["over_seeds"]["verdict"] == "holds"


def test_c5_compares_each_pair_of_curves_on_the_seeds_both_have(tmp_path):
    bench = load_bench()
    work = tmp_path / "work"
    _synthetic_work(bench, work, with_sde=True)
    bed, runs = bench.TESTBEDS["digits"], {r.name: r for r in bench.all_runs(100)}
    for s in (6, 7):  # extra seeds of C1's pair only (AM-4 0.01 above AM-Full): read, and they shrink no curve
        for name, value in (("ODE-AM-4 p=2 lambda=10", -0.07), ("ODE-AM-Full p=2 lambda=10", -0.08)):
            _write(bench.eval_file(work, bed, s, runs[name].slug), {JUDGE: value})
            _fake_run(bench.run_dir(work, bed, runs[name], s), 100, 10.0, 0.5)
    out = bench.main(["--phase", "report", "--seeds", *map(str, SEEDS), "--work_dir", str(work), "--reuse",
                      "--timing_rounds", "3"])
    c1 = [t for t in out["testbeds"]["digits"]["analysis"]["tests"] if t["label"].startswith("AM-4 minus AM-Full")]
    assert c1[0]["n"] == 8 and c1[0]["diffs"][6:] == pytest.approx([0.01, 0.01])
    p2 = out["testbeds"]["digits"]["analysis"]["claims"]["C2"]["choice"]["p2"]  # the whole curve is kept
    assert p2.keys() == set(map(str, SEEDS)) and set(p2.values()) == {"ODE-AM-4 p=2 lambda=160"}
    tests = {t["label"]: t for t in out["testbeds"]["digits"]["analysis"]["tests"] if t["claim"] == "C5"}
    at = ", each at its leave-one-out lambda, reward/digits-heldout"
    # every curve's best (leave-one-out) is its top lambda: ODE -0.10 + 0.06; memoryless -0.08 + 0.001 (s % 2);
    # sine -0.075 + 0.002 (s % 3 - 1), on seeds 0-3 only; the extra seeds 6, 7 hold no curve point here
    ode = tests["ODE-AM-4 minus SDE-AM-4 memoryless" + at]
    assert ode["diffs"] == pytest.approx([0.04 - 0.001 * (s % 2) for s in SEEDS]) and ode["verdict"] == "holds"
    sine = tests["SDE-AM-4 sine minus SDE-AM-4 memoryless" + at]
    jitter = [0.002 * (s % 3 - 1) for s in range(4)]
    assert sine["n"] == 4 and sine["diffs"] == pytest.approx([0.005 + j - 0.001 * (s % 2)
                                                               for s, j in enumerate(jitter)])
    # memoryless's points 3 and 4 (reward -0.09 + e, -0.08 + e; recall 0.7, 0.6; e = 0.001 (s % 2)) lie in sine's
    # reward range [-0.095 + j, -0.075 + j], point 2 does not; there sine's curve is at i = 0.5 and 1.5 + 100 (e - j),
    # recall 1 - 0.05 i: gaps 0.275 and 0.325 - 5 (e - j), mean 0.3 - 5 (e - j)
    front = tests["SDE-AM-4 sine minus SDE-AM-4 memoryless in recall at equal held-out reward (mean over "
                  "memoryless's lambda points inside sine's reward range)"]
    assert front["diffs"] == pytest.approx([0.3 - 0.005 * (s % 2) + 5 * j for s, j in enumerate(jitter)])
    assert front["verdict"] == "holds"
    c5 = out["testbeds"]["digits"]["analysis"]["claims"]["C5"]
    assert c5["bracket"]["memoryless"]["best"] == "SDE-AM-4 memoryless lambda=1000"
    assert not any(k.startswith("linear") for k in c5)  # not run: no test
    # constant never reaches memoryless's reward: its reward test stays, no recall test at matched reward
    assert tests["SDE-AM-4 constant minus SDE-AM-4 memoryless" + at]["verdict"] == "does not hold"
    assert "constant_vs_memoryless_frontier_recall" not in c5 and c5["never_reaches_memoryless"] == ["SDE-AM-4 constant"]


def test_train_phase_refuses_existing_runs_without_reuse(tmp_path):
    bench = load_bench()
    _synthetic_work(bench, tmp_path / "work")
    with pytest.raises(SystemExit, match="pass --reuse"):
        bench.main(["--phase", "train", "--tiers", "1", "--seeds", "0", "--work_dir", str(tmp_path / "work")])
    with pytest.raises(SystemExit):
        bench.parse_args(["--work_dir", "w", "--only", "no such run"])


def test_ms_ssim_32px_is_the_library_ms_ssim_with_three_scales():
    from pytorch_msssim import ms_ssim

    bench = load_bench()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 48, 48, generator=gen)  # 48 px: the smallest the library accepts with a 3 px window
    y = (x + 0.3 * torch.rand(3, 3, 48, 48, generator=gen)).clamp(0, 1)
    w = [0.0448, 0.2856, 0.3001]
    ref = 1 - ms_ssim(x, y, data_range=1.0, size_average=False, win_size=3, weights=[v / sum(w) for v in w])
    assert torch.allclose(bench.ms_ssim_32px(x, y), ref, atol=1e-6)
    x32 = torch.rand(2, 3, 32, 32, generator=gen)
    assert torch.allclose(bench.ms_ssim_32px(x32, x32), torch.zeros(2), atol=1e-6)
    assert (bench.ms_ssim_32px(x32, torch.rand(2, 3, 32, 32, generator=gen)) > 0.5).all()


def test_tiny_real_train_and_report(tmp_path):
    """Two configurations x 2 seeds x 2 updates through the real trainer, evaluation and the learned control,
    then the report read back with --reuse (nothing retrained)."""
    bench = load_bench()
    work = tmp_path / "work"
    common = ["--seeds", "0", "1", "--max_train_steps", "2", "--num_images_per_prompt", "3", "--work_dir", str(work),
              "--only", "ODE-AM-4 p=2 lambda=10", "ODE-AM-Full p=2 lambda=10"]
    bench.main(["--phase", "train", "--tiers", "1", *common])
    slug = "ode-am-4-p-2-lambda-10"
    adapter = work / "digits" / "seed1" / slug / "pytorch_lora_weights.safetensors"
    stamp = adapter.stat().st_mtime_ns
    out = bench.main(["--phase", "report", "--reuse", *common, "--json", str(tmp_path / "c.json")])
    assert adapter.stat().st_mtime_ns == stamp
    bed = out["testbeds"]["digits"]
    assert bed["runs_finished"] == 4
    energy = bed["collected"]["controls"]["ODE-AM-Full p=2 lambda=10|0"]["energy"]
    assert len(energy) == 20 and all(e >= 0 for e in energy)
    c1 = [t for t in bed["analysis"]["tests"] if t["claim"] == "C1"][0]
    assert c1["n"] == 2 and c1["verdict"] in ("holds", "does not hold", "undecided")


def test_a_killed_run_continues_from_its_checkpoint(tmp_path):
    """A run stopped after 2 of its 4 updates (its newest checkpoint: update 2) is continued, not started again:
    its first two log records stay as they were, its wall time is unknown, and its adapter is the one of the
    same run trained straight through."""
    import safetensors.torch

    bench = load_bench()
    bed = bench.TESTBEDS["digits"]
    run = next(r for r in bench.all_runs() if r.name == "ODE-AM-4 p=2 lambda=10")
    out = tmp_path / "stopped"
    bench.train(bed, run, 0, out, 2, reuse=False)
    for name in ("claims_wall_seconds.json", "train_summary.json"):  # a killed run has written neither
        (out / name).unlink()
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    first = bench._records(out)
    numbers = bench.train(bed, run, 0, out, 4, reuse=True)
    assert numbers["wall_seconds"] is None and not numbers["reused"] and numbers["updates"] == 4
    assert bench._records(out)[:2] == first
    straight = tmp_path / "straight"
    assert bench.train(bed, run, 0, straight, 4, reuse=False)["wall_seconds"] > 0
    a, b = (safetensors.torch.load_file(d / "pytorch_lora_weights.safetensors") for d in (out, straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_report_continues_from_an_earlier_json(tmp_path):
    """--continue_from: an earlier report's JSON alone (its work dir gone) gives the same verdicts; a work dir
    beside it adds its runs and wins where both hold one; an edited or foreign JSON is a one-line error."""
    bench = load_bench()
    _synthetic_work(bench, tmp_path / "work")
    first = tmp_path / "first.json"
    common = ["--phase", "report", "--seeds", *map(str, SEEDS), "--reuse", "--timing_rounds", "3"]
    before = bench.main([*common, "--work_dir", str(tmp_path / "work"), "--json", str(first)])["testbeds"]["digits"]

    md = tmp_path / "again.md"
    alone = bench.main([*common, "--work_dir", str(tmp_path / "empty"), "--continue_from", str(first),
                        "--output", str(md)])
    again = alone["testbeds"]["digits"]
    assert [(t["label"], t["diffs"], t["verdict"]) for t in again["analysis"]["tests"]] == \
        [(t["label"], t["diffs"], t["verdict"]) for t in before["analysis"]["tests"]]
    assert again["analysis"]["timing"] == before["analysis"]["timing"]  # the timing rounds came along
    cont = alone["provenance"]["continued_from"]
    assert cont["testbeds"]["digits"] == {"runs": before["runs_finished"], "replaced_by_work_dir": 0,
                                          "timing": "continued"}
    assert f"- continued from `{first}`" in md.read_text()

    # a new work dir: AM-Full trained again on seed 0 (now 0.03 below AM-4 instead of 0.01 - jitter) and a seed 6
    bed, runs = bench.TESTBEDS["digits"], {r.name: r for r in bench.all_runs(100)}
    new = tmp_path / "new"
    for s, name, value in ((0, "ODE-AM-Full p=2 lambda=10", -0.08 - 0.03), (6, "ODE-AM-4 p=2 lambda=10", -0.05),
                           (6, "ODE-AM-Full p=2 lambda=10", -0.07)):
        _write(bench.eval_file(new, bed, s, runs[name].slug), {JUDGE: value})
        _fake_run(bench.run_dir(new, bed, runs[name], s), 100, 10.0, 0.5)
    merged = bench.main([*common, "--work_dir", str(new), "--continue_from", str(first)])
    c1 = next(t for t in merged["testbeds"]["digits"]["analysis"]["tests"] if t["label"].startswith("AM-4 minus AM-"))
    assert c1["n"] == 7 and c1["diffs"] == pytest.approx([0.03] + [0.01 - 0.002 * (s % 3 - 1) for s in SEEDS][1:]
                                                         + [0.02])
    assert merged["provenance"]["continued_from"]["testbeds"]["digits"]["replaced_by_work_dir"] == 1
    bench.main([*common, "--work_dir", str(new), "--continue_from", str(first), "--json", str(first)])  # in place
    assert json.loads(first.read_text())["testbeds"]["digits"]["runs_finished"] == before["runs_finished"] + 2

    with pytest.raises(SystemExit, match="no such file"):
        bench.main([*common, "--work_dir", str(new), "--continue_from", str(tmp_path / "none.json")])
    with pytest.raises(SystemExit, match="pass the same --max_train_steps"):
        bench.main([*common, "--work_dir", str(new), "--continue_from", str(first), "--max_train_steps", "50"])
    edited = json.loads(first.read_text())
    edited["testbeds"]["digits"]["collected"]["evals"]["ODE-AM-4 p=2 lambda=7|0"] = {JUDGE: 1.0}
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(SystemExit, match="names no configuration of this design"):
        bench.main([*common, "--work_dir", str(new), "--continue_from", str(tmp_path / "edited.json")])
    edited = json.loads(first.read_text())
    edited["testbeds"]["digits"]["collected"]["evals"]["ODE-AM-4 p=2 lambda=10|0"][JUDGE] = "high"
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(SystemExit, match="not a number"):
        bench.main([*common, "--work_dir", str(new), "--continue_from", str(tmp_path / "edited.json")])
