"""The method registry: every step function is one registered ``Method``, the trainer reads only the
registry, and a method registered from outside trains through the CLI and the card."""

import inspect
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _run_helpers import _fresh_accelerate_state, read_log, run, tiny_base  # noqa: E402,F401

from diffusers_am import objectives  # noqa: E402
from diffusers_am.training.config import TrainingConfig, build_parser  # noqa: E402
from diffusers_am.training.methods import (  # noqa: E402
    METHODS, Method, get_method, register_method, step_options, unregister_method,
)

BUILT_IN = ("ode-am", "sde-am", "draft", "refl")


def test_registry_covers_every_step_function():
    steps = {fn for name, fn in vars(objectives).items() if name.endswith("_step") and callable(fn)}
    assert steps == {m.step for m in METHODS.values() if m.name in BUILT_IN}
    assert tuple(METHODS)[:4] == BUILT_IN
    for method in METHODS.values():
        assert method.display_name and method.name in build_parser().format_help()


# The generator seeds of the documented rule (diffusers_am.prompts.derive_seed), pinned: the first 8 bytes,
# little-endian, of sha256 of the repr of (seed, *labels), top bit cleared. sha256(b"(5, 'sde', 2, 1)") begins
# ac 89 07 d2 a1 d2 f6 9c -> 0x1cf6d2a1d20789ac; sha256(b"(5, 'refl', 2)") begins 1f 72 d0 c7 42 15 18 5f ->
# 0x5f181542c7d0721f (seed 5, micro-batch size 2, slot 1).
SDE_SEED, REFL_SEED = 0x1CF6D2A1D20789AC, 0x5F181542C7D0721F


@pytest.mark.parametrize("name", BUILT_IN)
def test_step_options_fit_the_step_function_and_seed_as_before(name):
    cfg = TrainingConfig(method=name, seed=5, micro_batch_size=2, reg_order=3.0, loss_reduction="mean")
    method = get_method(name)
    options = step_options(method, cfg)  # built once per run
    draws = method.draws(5, 2, 1, torch.device("cpu")) if method.draws is not None else {}
    kwargs = {"truncate_steps": 3, "reward_scale": 7.0, "backward": print, **options, **draws}
    inspect.signature(method.step).bind(None, None, None, None, **kwargs)  # every kwarg is one it takes
    assert options["micro_batch_size"] == 2
    if name == "ode-am":
        assert (options["order"], options["loss_reduction"]) == (3.0, "mean")
    if name == "sde-am":
        assert options["loss_reduction"] == "mean" and options["schedule"] is not None
        expected = torch.Generator().manual_seed(SDE_SEED)
        assert torch.equal(draws["generator"].get_state(), expected.get_state())
    if name == "refl":  # one j per update: the same for every micro-batch slot
        expected = torch.Generator().manual_seed(REFL_SEED)
        assert torch.equal(draws["generator"].get_state(), expected.get_state())
        assert torch.equal(method.draws(5, 2, 3, torch.device("cpu"))["generator"].get_state(), expected.get_state())
    if name == "draft":
        assert method.draws is None and set(options) == {"micro_batch_size"}
    assert method.profile_length(3) == (1 if name == "refl" else 3)
    assert (method.control is not None) == (name in ("ode-am", "sde-am"))


CALLS = {"n": 0}


def one_step_draft(flow, noise, times, reward_fn, *, truncate_steps, reward_scale, backward):
    """A toy method: DRaFT through the last step only."""
    CALLS["n"] += 1
    return objectives.draft_step(flow, noise, times, reward_fn, truncate_steps=1, reward_scale=reward_scale,
                                 backward=backward)


def no_options(cfg):
    return {}


@pytest.fixture
def toy_method():
    method = register_method(Method("toy-last-step", "toy last-step DRaFT", one_step_draft, no_options,
                                    single_step_profile=True))
    yield method
    unregister_method(method.name)


def test_a_registered_toy_method_trains_through_the_trainer(tiny_base, tmp_path, toy_method):
    with pytest.raises(ValueError, match="already registered"):
        register_method(toy_method)
    CALLS["n"] = 0
    out = tmp_path / "toy"
    assert run(tiny_base, out, "--method", "toy-last-step", "--max_train_steps", "1") == 0
    assert CALLS["n"] == 1
    (record,) = read_log(out)
    assert record["loss"] is not None and len(record["control_norm_per_step"]) == 1
    assert "Toy last-step DRaFT LoRA" in (out / "README.md").read_text()
    assert json.loads((out / "training_config.json").read_text())["method"] == "toy-last-step"
    with pytest.raises(ValueError, match="needs a method with a control to measure"):
        TrainingConfig(method="toy-last-step", truncate_steps="auto")


def test_an_unknown_method_lists_the_registry():
    with pytest.raises(ValueError, match="`--method` must be one of ode-am, sde-am, draft, refl; got 'nope'"):
        TrainingConfig(method="nope")
