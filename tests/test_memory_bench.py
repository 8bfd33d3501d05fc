"""benchmarks/memory.py --quick: fresh-process peaks per point, the claims and the klein-4B estimate."""

import json

import pytest
from _scripts import load_script


@pytest.fixture(scope="module")
def memory():
    return load_script("benchmarks/memory.py", "memory_bench")


def test_quick_run_writes_the_table_and_claims(memory, tmp_path):
    out = tmp_path / "MEMORY.md"
    assert memory.main(["--quick", "--bases", "digits", "--output", str(out)]) == 0
    text = out.read_text()
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    points = {(r["sweep"], r["K"], r["micro"]) for r in rows}
    assert points == {("K", 1, 2), ("K", 4, 2), ("micro", 4, 1), ("micro", 4, 2)}
    assert all(r["peak_bytes"] >= r["start_bytes"] > 0 for r in rows)
    assert "digits, batch 4: peak over K = [1, 4]" in text and "24 GiB recipe" in text


def test_claims_and_estimate_from_given_rows(memory):
    def row(sweep, k, micro, peak, up):
        return {"base": "b", "sweep": sweep, "K": k, "N": 8, "batch": 16, "micro": micro, "device": "cpu",
                "peak_bytes": peak, "start_bytes": peak - up, "update_bytes": up}

    rows = [row("K", 1, 4, 100, 10), row("K", 8, 4, 130, 40)]
    rows += [row("micro", 4, m, 100 + 5 * m, 5 * m) for m in (1, 2, 4)]
    lines = memory.claims(rows)
    assert "NOT flat within 10%" in lines[0] and "R^2 = 1.000 (linear in micro-batch)" in lines[1]
    table, recipe = memory.klein_estimate(budget_gib=24.0)
    assert "| 16 | off | resident |" in table and "--micro_batch_size" in recipe
    assert "no setting fits" in memory.klein_estimate(budget_gib=4.0)[1]


def test_bad_base_is_a_usage_error(memory, capsys):
    assert memory.main(["--quick", "--bases", "sd3"]) == 2
    assert "--bases" in capsys.readouterr().err


def test_quantized_recipes_fit_their_cards(memory):
    """The klein-4B / klein-9B recipes: every listed peak fits 90% of its card, a larger card never needs a more
    aggressive quantization, and the weights follow the published configs (3.88 B / 9.08 B transformers)."""
    table, rows = memory.quantized_recipes()
    from flux2_update import KLEIN_4B, KLEIN_9B

    assert memory._klein_counts(KLEIN_4B, lambda n: [])["params"] == memory.KLEIN_4B_TRANSFORMER_PARAMS
    assert round(memory._klein_counts(KLEIN_9B, lambda n: [])["params"] / 1e9, 2) == 9.08
    assert len(rows) == 2 * 2 * 4 and "(estimate)" in table
    order = {"none": 0, "int8": 1, "nf4": 2, None: 3}
    for model in ("klein-4B", "klein-9B"):
        for px in (256, 512):
            pts = sorted((r for r in rows if r["model"] == model and r["px"] == px), key=lambda r: r["card"])
            assert [order[r["mode"]] for r in pts] == sorted((order[r["mode"]] for r in pts), reverse=True)
            for r in pts:
                assert r["peak_gib"] is None or r["peak_gib"] <= 0.9 * r["card"]
    # bf16 klein-9B weights alone (16.9 GiB) exceed a 16 GiB card; NF4 brings it under
    nine = {(r["px"], r["card"]): r for r in rows if r["model"] == "klein-9B"}
    assert nine[(256, 16)]["mode"] == "nf4" and nine[(256, 48)]["mode"] == "none"
    # a cheaper base, same activations: NF4 bytes < int8 bytes < bf16 bytes
    nf4, int8, bf16 = (memory._stored_bytes(10**6, 10**6, mode) for mode in ("nf4", "int8", "none"))
    assert nf4 < int8 < bf16
    mib = 2**20
    rows_q = [{"base": "w", "quantize": q, "transformer_bytes": b * mib, "peak_bytes": p * mib, "update_bytes": mib}
              for q, b, p in (("none", 400, 1000), ("nf4", 60, 700))]
    assert "| w | nf4 | 60.0 | 700.0 | 1.0 | 300.0 |" in memory.quantize_table(rows_q)
