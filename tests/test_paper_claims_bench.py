"""benchmarks/paper_claims.py --quick end to end (the full sweep takes about half an hour: not here)."""

import json

from _scripts import load_script


def load_bench():
    return load_script("benchmarks/paper_claims.py", "paper_claims")


def test_paired_verdicts():
    bench = load_bench()
    assert bench.paired([0.1, 0.12, 0.11])["verdict"] == "holds"
    assert bench.paired([-0.1, -0.12, -0.11])["verdict"] == "does not hold here"
    assert bench.paired([0.1, -0.1, 0.02])["verdict"] == "inconclusive"
    assert bench.paired([0.5])["verdict"] == "inconclusive"  # one seed: no spread, no verdict
    assert bench.unanimous([True, True]) == "holds" and bench.unanimous([True]) == "inconclusive"
    names = [r.slug for r in bench.all_runs()]
    assert len(names) == len(set(names)) == 20  # one folder per configuration


def test_quick_run_writes_report_plots_and_json(tmp_path):
    bench = load_bench()
    md, js = tmp_path / "CLAIMS.md", tmp_path / "claims.json"
    out = bench.main(["--quick", "--work_dir", str(tmp_path / "work"), "--output", str(md), "--json", str(js)])
    text = md.read_text()
    for heading in ("## C1", "## C2", "## C3", "## C4", "## C5", "## Adaptive truncation"):
        assert heading in text
    for png in ("claims_k.png", "claims_frontier.png", "claims_profile.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"]({png})" in text
    data = json.loads(js.read_text())
    assert set(data["verdicts"]) == {"C1", "C2", "C3", "C4", "C5", "auto"}
    assert data["verdicts"]["C1"]["verdict_most"] == "inconclusive"  # one seed in --quick
    runs = out["train"]
    auto = runs["ODE-AM-auto p=2 lambda=10|0"]
    assert all(1 <= k <= 20 for k in auto["k_values"])
    matched = runs["ODE-AM-4 p=4 lambda~10|0"]["reward_scale"]
    assert matched > 0 and matched != 10.0  # p = 4 at the lambda matched to p = 2's control size
    profile = out["profiles"][0]
    assert len(profile["p2"]["intensity"]) == 20 and max(profile["p2"]["intensity"]) == 1.0
