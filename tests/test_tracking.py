"""Each component of a weighted reward in the update record, and the validation grids in the tracker."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _run_helpers import _fresh_accelerate_state, read_log, run, tiny_base  # noqa: E402,F401

from diffusers_am.rewards import REWARDS, register_reward  # noqa: E402


def _bright(path=None, device=None, dtype=None):
    return lambda images, prompts: images.mean(dim=(1, 2, 3))


def _dark(path=None, device=None, dtype=None):
    return lambda images, prompts: 1.0 - images.amax(dim=(1, 2, 3))


@pytest.fixture
def two_rewards():
    register_reward("test-bright", _bright)
    register_reward("test-dark", _dark)
    yield "test-bright:1.0,test-dark:0.5"
    REWARDS.pop("test-bright")
    REWARDS.pop("test-dark")


def test_weighted_reward_components_and_grids_reach_the_log_and_tensorboard(tiny_base, tmp_path, two_rewards):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert run(tiny_base, out, "--reward", two_rewards, "--report_to", "tensorboard", "--validation_steps", "1",
               "--max_train_steps", "3") == 0
    records = read_log(out)
    for record in records:
        bright, dark = record["reward/test-bright"], record["reward/test-dark"]
        assert 0.0 <= bright <= 1.0 and 0.0 <= dark <= 1.0
        assert math.isclose(record["reward_mean"], bright + 0.5 * dark, rel_tol=1e-5, abs_tol=1e-6)
    for run_dir in [out / "logs", *sorted(p for p in (out / "logs").rglob("*") if p.is_dir())]:
        acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        if "validation/grid" in acc.Tags()["images"]:
            images = acc.Images("validation/grid")
            break
    else:
        pytest.fail("no validation/grid image in the tensorboard events")
    assert [im.step for im in images] == [0, 1, 2, 3]  # base, two updates' grids, the final grid
    assert all(im.width > 0 and im.height > 0 for im in images)
    scalars = acc.Tags()["scalars"]
    assert "reward/test-bright" in scalars and "reward/test-dark" in scalars


def test_a_single_reward_adds_no_component_fields(tiny_base, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_base, out, "--max_train_steps", "1") == 0
    (record,) = read_log(out)
    assert not [k for k in record if k.startswith("reward/")]
