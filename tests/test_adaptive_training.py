"""The trainer with ``--truncate_steps auto`` (adaptive window) and ``--match_reward_scale`` (matched lambda)."""

import json

import pytest
import torch
from _run_helpers import _fresh_accelerate_state, read_log, run, tiny_base  # noqa: F401
from safetensors.torch import load_file

from diffusers_am.training.config import TrainingConfig, parse_args


def _adapter(out):
    return load_file(out / "pytorch_lora_weights.safetensors")


def _assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def test_auto_window_logs_its_probes_and_k(tiny_base, tmp_path):
    out = tmp_path / "auto"
    assert run(tiny_base, out, "--truncate_steps", "auto", "--truncate_refresh_steps", "2", "--max_train_steps",
               "4") == 0
    log = read_log(out)
    assert [("probe" in r) for r in log] == [True, False, True, False]  # before updates 1 and 3
    for r in log:
        assert 1 <= r["truncate_steps"] <= 4 and len(r["control_norm_per_step"]) == r["truncate_steps"]
    probe = log[0]["probe"]
    assert len(probe["probe_energy_share"]) == 4 and sum(probe["probe_energy_share"]) == pytest.approx(1.0)
    summary = json.loads((out / "train_summary.json").read_text())
    assert [k for _, k in summary["truncate_steps_history"]] == [log[0]["truncate_steps"], log[2]["truncate_steps"]]
    assert "(auto: the window holding 0.3 of the control energy)" in (out / "README.md").read_text()


def test_auto_window_pinned_to_k_trains_exactly_like_fixed_k(tiny_base, tmp_path):
    # the probe draws from its own seeds and never touches the training RNG or the gradients
    fixed, auto = tmp_path / "fixed", tmp_path / "auto"
    assert run(tiny_base, fixed, "--truncate_steps", "3", "--max_train_steps", "3", "--lora_dropout", "0.1") == 0
    assert run(tiny_base, auto, "--truncate_steps", "auto", "--truncate_min_steps", "3", "--truncate_max_steps", "3",
               "--truncate_refresh_steps", "1", "--max_train_steps", "3", "--lora_dropout", "0.1") == 0
    _assert_same(_adapter(fixed), _adapter(auto))
    assert [r["loss"] for r in read_log(fixed)] == [r["loss"] for r in read_log(auto)]


def test_auto_window_resumes_exactly(tiny_base, tmp_path):
    common = ["--truncate_steps", "auto", "--truncate_refresh_steps", "3", "--truncate_share", "0.6",
              "--max_train_steps", "4", "--checkpointing_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(tiny_base, straight, *common) == 0
    assert run(tiny_base, resumed, *common, "--resume_from_checkpoint", str(straight / "checkpoint-2")) == 0
    _assert_same(_adapter(straight), _adapter(resumed), atol=1e-6)
    a, b = read_log(straight)[2:], read_log(resumed)
    assert [r["truncate_steps"] for r in a] == [r["truncate_steps"] for r in b]
    assert ["probe" in r for r in b] == [False, True]  # update 4 probes again (3 after the first), as straight
    history = json.loads((resumed / "train_summary.json").read_text())["truncate_steps_history"]
    assert history == json.loads((straight / "train_summary.json").read_text())["truncate_steps_history"]


def test_matched_lambda_of_order_two_is_the_reward_scale(tiny_base, tmp_path):
    out = tmp_path / "p2"
    assert run(tiny_base, out, "--match_reward_scale", "velocity", "--reward_scale", "7") == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["reward_scale"] == pytest.approx(7.0, rel=1e-6)  # p = 2 asks for what p = 2 asks for (fp32 probe)


def test_matched_lambda_is_the_lambda_the_updates_use(tiny_base, tmp_path, capsys):
    matched = tmp_path / "matched"
    assert run(tiny_base, matched, "--match_reward_scale", "reward_gain", "--reg_order", "4") == 0
    summary = json.loads((matched / "train_summary.json").read_text())
    lam = summary["reward_scale"]
    assert summary["reward_scale_match"]["statistic"] == "reward_gain" and lam != pytest.approx(10.0)
    assert f"lambda = {lam:.4g}" in capsys.readouterr().out
    assert "matched by reward_gain to 2nd-order ODE-AM at lambda = 10" in (matched / "README.md").read_text()
    direct = tmp_path / "direct"
    assert run(tiny_base, direct, "--reward_scale", repr(lam), "--reg_order", "4") == 0
    _assert_same(_adapter(matched), _adapter(direct))


def test_matched_lambda_is_kept_on_resume(tiny_base, tmp_path):
    common = ["--match_reward_scale", "velocity", "--method", "sde-am", "--max_train_steps", "4",
              "--checkpointing_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(tiny_base, straight, *common) == 0
    assert run(tiny_base, resumed, *common, "--resume_from_checkpoint", str(straight / "checkpoint-2")) == 0
    s, r = (json.loads((d / "train_summary.json").read_text()) for d in (straight, resumed))
    assert s["reward_scale"] == r["reward_scale"] and s["reward_scale_match"] == r["reward_scale_match"]
    _assert_same(_adapter(straight), _adapter(resumed), atol=1e-6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"truncate_steps": "auto", "method": "draft"}, "truncate_steps auto.*needs a method"),
        ({"match_reward_scale": "velocity", "method": "refl"}, "match_reward_scale velocity.*needs a method"),
        ({"truncate_steps": "sometimes"}, "truncate_steps.*integer or 'auto'"),
        ({"truncate_share": 0.0}, "truncate_share"),
        ({"truncate_smoothing": 1.0}, "truncate_smoothing"),
        ({"truncate_min_steps": 3, "truncate_max_steps": 2}, "truncate_max_steps.*>= 3"),
        ({"truncate_max_steps": 30, "num_inference_steps": 20}, "truncate_max_steps.*num_inference_steps"),
        ({"match_reward_scale": "lpips"}, "match_reward_scale.*none, velocity, reward_gain"),
        ({"match_probe_batches": 0}, "match_probe_batches"),
    ],
)
def test_bad_adaptive_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig(**overrides)


def test_auto_on_the_command_line():
    assert parse_args(["--truncate_steps", "AUTO"]).truncate_steps == "auto"
    assert parse_args(["--truncate_steps", "5"]).truncate_steps == 5
    assert TrainingConfig(truncate_steps="auto", method="sde-am").adaptive_truncation


@pytest.mark.parametrize("method", ["ode-am", "sde-am"])
def test_auto_and_matched_lambda_with_the_flags_users_combine(tiny_base, tmp_path, method):
    # adaptive K + matched lambda + bf16 autocast + EMA + gradient checkpointing + micro-batches + checkpoints,
    # then a resume: one run with everything on, as a user types it
    flags = ["--method", method, "--truncate_steps", "auto", "--truncate_refresh_steps", "2", "--match_reward_scale",
             "velocity", "--mixed_precision", "bf16", "--use_ema", "--gradient_checkpointing",
             "--micro_batch_size", "2",
             "--checkpointing_steps", "2", "--max_train_steps", "3"]
    out = tmp_path / "all"
    assert run(tiny_base, out, *flags) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["reward_scale_match"]["statistic"] == "velocity" and summary["skipped_updates"] == 0
    assert all(torch.isfinite(t).all() for t in _adapter(out).values())
    assert run(tiny_base, out, *flags, "--max_train_steps", "4", "--resume_from_checkpoint", "latest") == 0
    resumed = json.loads((out / "train_summary.json").read_text())
    assert resumed["reward_scale"] == summary["reward_scale"] and [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
