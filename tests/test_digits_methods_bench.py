"""benchmarks/digits_methods.py end to end on a 2-update budget (the full run takes minutes: not here)."""

import json
import math
from pathlib import Path

from _run_helpers import _fresh_accelerate_state  # noqa: F401  (fixture)
from _scripts import load_script

def load_bench():
    return load_script("benchmarks/digits_methods.py", "digits_methods")


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_digits_methods_tiny_budget(tmp_path):
    bench = load_bench()
    md, js = tmp_path / "DIGITS.md", tmp_path / "digits.json"
    out = bench.main([
        "--max_train_steps", "2", "--methods", "2nd ODE-AM-4,DRaFT-1", "--num_images_per_prompt", "2",
        "--work_dir", str(tmp_path / "work"), "--output", str(md), "--json", str(js), "--quiet",
    ])
    table = out["table"].strip().splitlines()
    assert _cells(table[0]) == bench.COLUMNS
    rows = {(_cells(line)[0]): _cells(line) for line in table[2:]}
    assert list(rows) == ["base (no fine-tuning)", "2nd ODE-AM-4", "DRaFT-1"]
    assert rows["2nd ODE-AM-4"][1:4] == ["4", "2", "10"] and rows["DRaFT-1"][1:3] == ["1", "–"]
    for name in ("2nd ODE-AM-4", "DRaFT-1"):
        values = [float(c) for c in rows[name][4:]]  # s/update and every metric are numbers
        assert all(math.isfinite(v) for v in values), rows[name]
        assert values[0] > 0  # s/update
        assert values[1] <= 0 and values[2] <= 0  # log-probability rewards
        assert all(0 <= v <= 1 for v in (values[3], values[6], values[7]))  # accuracy, recall, coverage
    base = rows["base (no fine-tuning)"]
    assert [float(c) for c in base[5:10]] and base[10:] == ["–", "–"]
    # the runs really trained: 2 updates each, logged by the trainer
    for run in out["runs"]:
        log = Path(run["adapter_dir"]) / "train_log.jsonl"
        assert len(log.read_text().splitlines()) == 2
        assert (Path(run["adapter_dir"]) / "pytorch_lora_weights.safetensors").is_file()
    report = md.read_text()
    assert "python benchmarks/digits_methods.py --max_train_steps 2" in report and "| DRaFT-1 |" in report
    assert "torch" in report and "CPU cores" in report
    saved = json.loads(js.read_text())
    assert [r["method"] for r in saved["rows"]] == list(rows)
    assert saved["runs"][0]["seconds_per_update_median"] > 0
