"""--compile: regional torch.compile of the transformer blocks gives the eager run's losses."""

import pytest
import torch
from _run_helpers import read_log, run

from diffusers_am.models import EMBEDDED_DIGITS_BASE
from diffusers_am.training.engines import compile_repeated_blocks


@pytest.fixture(autouse=True)
def _reset_dynamo():
    yield
    torch._dynamo.reset()


def test_compiled_run_matches_eager_on_digits(tmp_path, capsys):
    """aot_eager (graph capture without C++ codegen) keeps the test well under a minute on CPU; inductor runs
    the same path with generated kernels (its first compile takes ~80 s on a shared 2-core CPU)."""
    from accelerate.state import AcceleratorState

    logs = []
    for extra in ([], ["--compile", "--compile_backend", "aot_eager"]):
        out = tmp_path / f"run{len(extra)}"
        assert run(EMBEDDED_DIGITS_BASE, out, "--max_train_steps", "3", *extra) == 0
        AcceleratorState._reset_state(reset_partial_state=True)
        logs.append([r for r in read_log(out) if "loss" in r])
    eager, compiled = logs
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["reward_mean"] == pytest.approx(a["reward_mean"], rel=1e-4, abs=1e-6)
    assert "compile_seconds" in compiled[1] and "compile_seconds" not in eager[1]
    printed = capsys.readouterr().out
    assert "--compile: 4 transformer blocks compiled (aot_eager)" in printed and "compilation took about" in printed


def test_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="--compile"):
        compile_repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))
