"""The real trainer end to end on a tiny random SiT pipeline saved with ``save_pretrained``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_adjoint_matching as script  # noqa: E402
from _run_helpers import _fresh_accelerate_state, read_log, run, snapshot, tiny_args, tiny_base  # noqa: E402,F401
from diffusers_am.training.checkpoints import CheckpointManager, list_checkpoints  # noqa: E402
from diffusers_am.training.logs import REQUIRED_FIELDS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VALUES = ["--adam_epsilon", "1.0", "--learning_rate", "1.0"]
"""Adam's first steps are about lr * sign(g) at the default epsilon; with a large one the step is lr * g / (|g| +
eps), so the compared adapters differ where the gradients' values differ, not only their signs."""


# -- a tiny run writes everything ------------------------------------------------------------------
def test_tiny_run_writes_adapter_grids_card_log(tiny_base, tmp_path, monkeypatch, capsys):
    from diffusers_am.pipelines.sit import SiTPipeline
    from diffusers_am.training import outputs as hub

    pushed = {}
    monkeypatch.setattr(hub, "prepare_repo", lambda repo, token=None: pushed.update(created=repo) or f"me/{repo[3:]}")
    monkeypatch.setattr(
        hub,
        "upload_output_dir",
        lambda out, repo, files, token=None: pushed.update(out=out, repo=repo, files=files, token=token) or "url",
    )
    out = tmp_path / "run"
    rc = run(
        tiny_base,
        out,
        "--validation_steps",
        "1",
        "--report_to",
        "tensorboard",
        "--push_to_hub",
        "--hub_model_id",
        "me/tiny-am",
        "--hub_token",
        "hf_SECRET_token_123",
        "--learning_rate",
        "0.05",
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "reward before:" in printed and str(out / "pytorch_lora_weights.safetensors") in printed

    for name in (
        "pytorch_lora_weights.safetensors",
        "samples.png",
        "validation/step-000001.png",
        "validation/final.png",
        "validation/base.png",
        "README.md",
        "train_log.jsonl",
        "train_summary.json",
        "training_config.json",
    ):
        assert (out / name).is_file(), name
    assert not (out / "validation/step-000002.png").exists()  # the last update writes final.png instead
    assert any((out / "logs").rglob("events.out.tfevents*"))
    records = read_log(out)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert set(REQUIRED_FIELDS) <= set(r)
        assert len(r["control_norm_per_step"]) == 2 and r["skipped"] is False and r["nonfinite_count"] == 0
        assert all(isinstance(r[k], float) for k in ("reward_mean", "reward_std", "loss", "grad_norm", "seconds"))
        assert r["peak_memory_bytes"] > 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert (
        summary["steps"] == 2
        and isinstance(summary["reward_before"], float)
        and isinstance(summary["reward_after"], float)
    )

    card = (out / "README.md").read_text()
    assert "ode-am" in card and "2 of 4" in card and 'pipe.load_lora_weights("me/tiny-am")' in card
    assert f"{summary['reward_after']:.4g}" in card and "samples.png" in card and "validation/base.png" in card
    assert pushed.pop("files")[0] == "pytorch_lora_weights.safetensors"
    assert pushed == {"created": "me/tiny-am", "out": out, "repo": "me/tiny-am", "token": "hf_SECRET_token_123"}
    for path in out.rglob("*"):
        if path.is_file():
            assert b"hf_SECRET_token_123" not in path.read_bytes(), path

    # the adapter loads into the stock pipeline and changes its samples
    pipe = SiTPipeline.from_pretrained(str(tiny_base))
    base_img = pipe(
        class_labels=[1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    pipe.load_lora_weights(str(out))
    tuned = pipe(
        class_labels=[1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert torch.isfinite(tuned).all() and not torch.allclose(base_img, tuned)


@pytest.mark.parametrize(
    "method, extra",
    [
        ("ode-am", ["--reg_order", "4", "--gradient_accumulation_steps", "2"]),
        ("sde-am", []),
        ("draft", ["--gradient_checkpointing"]),
        ("refl", ["--mixed_precision", "bf16"]),
    ],
)
def test_all_methods_run_and_log_the_norm_of_the_applied_update(tiny_base, tmp_path, method, extra):
    """Each method's one update is the logged gradient, clipped: at --adam_epsilon = --learning_rate = 1e6 Adam's
    first step is lr * g / (|g| + eps) = g to ~1e-6, and LoRA B starts at 0 (so A gets no gradient), hence the saved
    lora_B tensors are minus the clipped gradient and their norm is min(grad_norm, max_grad_norm), grad_norm being
    the norm before clipping. sde-am's gradient (about 7) is the one clipped at 5."""
    out = tmp_path / method
    threads = torch.get_num_threads()
    clip = 5.0
    flags = ["--learning_rate", "1e6", "--adam_epsilon", "1e6", "--max_grad_norm", str(clip)]
    assert run(tiny_base, out, "--method", method, "--max_train_steps", "1", "--cpu_threads", "1", *flags, *extra) == 0
    assert torch.get_num_threads() == threads  # restored after the run
    (record,) = read_log(out)
    assert record["loss"] is not None and len(record["control_norm_per_step"]) == (1 if method == "refl" else 2)
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    update_norm = sum(float(v.double().pow(2).sum()) for k, v in weights.items() if "lora_B" in k) ** 0.5
    assert update_norm == pytest.approx(min(record["grad_norm"], clip), rel=1e-5)
    assert (record["grad_norm"] > clip) == (method == "sde-am")  # both the clipped and the unclipped case run


# -- resume ------------------------------------------------------------------------------------------
def test_resume_two_plus_two_equals_four(tiny_base, tmp_path):
    common = [
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
        "--use_ema",
        "--lora_dropout",
        "0.2",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "1",
        "--learning_rate",
        "0.02",
        "--adam_epsilon",  # Adam's step lr * g / (|g| + eps): the adapters compare gradient values, not signs
        "1.0",
    ]
    straight = tmp_path / "straight"
    assert run(tiny_base, straight, *common) == 0
    assert [p.name for _, p in list_checkpoints(straight)] == ["checkpoint-2", "checkpoint-4"]
    ckpt = straight / "checkpoint-2"
    assert {
        "trainable_params.safetensors",
        "pytorch_lora_weights.safetensors",
        "training_state.safetensors",  # optimizer, LR schedule and EMA, without pickle
        "training_state.json",
        "rng_state_0.safetensors",
        "trainer_state.json",
    } <= {p.name for p in ckpt.iterdir()}
    assert not [p.name for p in ckpt.iterdir() if p.suffix in (".pkl", ".bin", ".pt")]

    resumed = tmp_path / "resumed"
    assert run(tiny_base, resumed, *common, "--resume_from_checkpoint", str(ckpt)) == 0
    a, b = load_file(straight / "pytorch_lora_weights.safetensors"), load_file(
        resumed / "pytorch_lora_weights.safetensors"
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    a_log, b_log = read_log(straight), read_log(resumed)
    assert [r["step"] for r in b_log] == [3, 4]
    for ra, rb in zip(a_log[2:], b_log):
        assert ra["reward_mean"] == pytest.approx(rb["reward_mean"], abs=1e-6)
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["lr"] == pytest.approx(rb["lr"])

    # `latest` in the run's own folder continues it, and the log keeps one record per step
    assert run(tiny_base, straight, *common, "--max_train_steps", "5", "--resume_from_checkpoint", "latest") == 0
    assert [r["step"] for r in read_log(straight)] == [1, 2, 3, 4, 5]


def test_ema_adapter_is_the_ema_of_the_updates(tiny_base, tmp_path):
    """--use_ema: the saved adapter is the EMA of the weights after each update (each checkpoint's adapter), with
    diffusers EMAModel's rule written out here: decay 0 at update 1, then min(ema_decay, (1 + n) / (10 + n)) at
    update n + 1; ema <- decay * ema + (1 - decay) * weights."""
    out = tmp_path / "ema"
    ema_decay = 0.2
    args = ["--use_ema", "--ema_decay", str(ema_decay), "--max_train_steps", "3", "--checkpointing_steps", "1",
            "--learning_rate", "0.05", "--adam_epsilon", "1.0"]
    assert run(tiny_base, out, *args) == 0
    updates = [load_file(out / f"checkpoint-{n}" / "pytorch_lora_weights.safetensors") for n in (1, 2, 3)]
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    assert saved.keys() == updates[0].keys()
    ema = dict(updates[0])
    for n, weights in enumerate(updates[1:], start=1):
        decay = min(ema_decay, (1 + n) / (10 + n))
        ema = {k: decay * ema[k] + (1 - decay) * weights[k] for k in ema}
    for k in saved:
        torch.testing.assert_close(saved[k], ema[k], atol=1e-7, rtol=1e-6)
    # the EMA is not the last update's weights (the rule above is what makes the test pass)
    assert max(float((saved[k] - updates[-1][k]).abs().max()) for k in saved) > 1e-4 * max(
        float(v.abs().max()) for k, v in saved.items() if "lora_B" in k
    )


def test_push_to_hub_uploads_the_run_files_and_its_card(tiny_base, tmp_path, monkeypatch):
    """--push_to_hub end to end with the Hub replaced by a local folder: upload_folder's allow_patterns resolved by
    huggingface_hub's own filter on the run folder give the uploaded set (adapter, card, grids, config, logs,
    validation images; never checkpoints, the lock or the run marker), and the card is the run's."""
    import shutil

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import filter_repo_objects

    remote = tmp_path / "remote"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, exist_ok, token: huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}"))

    def upload_folder(*, repo_id, folder_path, allow_patterns, token, **kwargs):
        assert repo_id == "user/tiny-adapter" and not kwargs.get("path_in_repo")
        local = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        for name in filter_repo_objects(local, allow_patterns=allow_patterns, ignore_patterns=kwargs.get("ignore_patterns")):
            (remote / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(folder_path) / name, remote / name)
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="", commit_description="",
            oid="0" * 40, pr_url=None,
        )

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "run"
    assert run(tiny_base, out, "--push_to_hub", "--hub_model_id", "user/tiny-adapter", "--checkpointing_steps", "1") == 0
    uploaded = {str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()}
    validation = {str(p.relative_to(out)) for p in (out / "validation").rglob("*") if p.is_file()}
    assert validation and uploaded == {
        "pytorch_lora_weights.safetensors", "README.md", "samples.png", "comparison.png", "train_summary.json",
        "training_config.json", "train_log.jsonl", *validation,
    } | ({"validation_log.jsonl"} if (out / "validation_log.jsonl").is_file() else set())  # none at --validation_steps 0
    assert list_checkpoints(out) and not any(name.startswith(("checkpoint-", ".")) for name in uploaded)
    for name in uploaded:  # the files themselves, byte for byte
        assert (remote / name).read_bytes() == (out / name).read_bytes(), name
    card = (remote / "README.md").read_text()
    summary = json.loads((out / "train_summary.json").read_text())
    assert 'pipe.load_lora_weights("user/tiny-adapter")' in card  # the card loads the adapter from the repo
    assert str(tiny_base) in card and "ode-am" in card and "samples.png" in card
    assert f"{summary['reward_before']:.4g}" in card and f"{summary['reward_after']:.4g}" in card


def test_interrupted_checkpoint_leaves_previous_usable(tiny_base, tmp_path, monkeypatch):
    original = CheckpointManager._save_hook
    calls = []

    def failing_hook(self, models, weights, output_dir):
        calls.append(output_dir)
        original(self, models, weights, output_dir)
        if len(calls) == 2:  # the write of checkpoint-2 dies halfway
            raise KeyboardInterrupt("killed while writing the checkpoint")

    monkeypatch.setattr(CheckpointManager, "_save_hook", failing_hook)
    out = tmp_path / "run"
    assert run(tiny_base, out, "--max_train_steps", "3", "--checkpointing_steps", "1") == 130
    assert (out / ".tmp-checkpoint-2").is_dir()
    assert [step for step, _ in list_checkpoints(out)] == [1]
    monkeypatch.setattr(CheckpointManager, "_save_hook", original)
    assert (
        run(
            tiny_base,
            out,
            "--max_train_steps",
            "3",
            "--checkpointing_steps",
            "1",
            "--checkpoints_total_limit",
            "2",
            "--resume_from_checkpoint",
            "latest",
        )
        == 0
    )
    assert [step for step, _ in list_checkpoints(out)] == [2, 3] and not (out / ".tmp-checkpoint-2").exists()
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


def test_missing_or_corrupt_checkpoint_is_a_clear_error(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_base, out, "--max_train_steps", "1", "--checkpointing_steps", "1") == 0
    before = snapshot(out)
    assert run(tiny_base, out, "--resume_from_checkpoint", str(tmp_path / "nope")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert snapshot(out) == before
    assert run(tiny_base, tmp_path / "empty", "--resume_from_checkpoint", "latest") == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists() or snapshot(tmp_path / "empty") == {}
    (out / "checkpoint-1" / "trainable_params.safetensors").write_bytes(b"not a safetensors file")
    before = snapshot(out)
    assert run(tiny_base, out, "--resume_from_checkpoint", "latest") == 2
    assert "every checkpoint in" in capsys.readouterr().err  # checkpoint-1's checksums no longer match
    assert snapshot(out) == before
    (out / "checkpoint-1" / "trainer_state.json").unlink()
    before = snapshot(out)
    assert run(tiny_base, out, "--resume_from_checkpoint", str(out / "checkpoint-1")) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert snapshot(out) == before


# -- bad input -----------------------------------------------------------------------------------------
NAN_REWARD = """
import torch
calls = [0]

def reward(images, prompts):
    r = images.mean(dim=(1, 2, 3))
    if images.shape[0] == 3:  # training batches (evaluation uses 4 samples)
        calls[0] += 1
        if calls[0] == 2:
            r = r * float("nan")
    return r
"""


def test_nan_reward_skips_the_update_and_is_counted(tiny_base, tmp_path, caplog):
    reward_file = tmp_path / "nan_reward.py"
    reward_file.write_text(NAN_REWARD)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="diffusers_am"):  # accelerate's logger, main process only
        rc = run(tiny_base, out, "--reward", f"{reward_file}:reward", "--max_train_steps", "3")
    assert rc == 0
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("diffusers_am.training")]
    assert any("update 2:" in m and "skipping this update" in m for m in warned)
    assert any(m.endswith("1 of 3 updates were skipped: the reward or the gradient was NaN or inf.") for m in warned)
    records = read_log(out)
    assert [r["skipped"] for r in records] == [False, True, False]
    assert [r["nonfinite_count"] for r in records] == [0, 1, 1]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    assert all(torch.isfinite(t).all() for t in load_file(out / "pytorch_lora_weights.safetensors").values())
    assert json.loads((out / "train_summary.json").read_text())["skipped_updates"] == 1


def test_bad_inputs_are_clear_and_keep_output_dir(tiny_base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "previous"
    assert run(tiny_base, out, "--max_train_steps", "1", "--num_eval_samples", "0") == 0  # an earlier run
    capsys.readouterr()
    before = snapshot(out)
    not_a_pipeline = tmp_path / "folder"
    not_a_pipeline.mkdir()
    unknown_class = tmp_path / "unknown"
    unknown_class.mkdir()
    (unknown_class / "model_index.json").write_text('{"_class_name": "MysteryPipeline"}')
    malformed = tmp_path / "labels.txt"
    malformed.write_text("1\n2\nthree\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cases = [
        ([], "already holds a run"),
        (["--overwrite_output_dir", "--reward", "no-such-reward"], "unknown reward"),
        (
            ["--overwrite_output_dir", "--pretrained_model_name_or_path", "nobody/no-such-model"],
            "hf download nobody/no-such-model",
        ),
        (
            ["--overwrite_output_dir", "--pretrained_model_name_or_path", str(not_a_pipeline)],
            "without model_index.json",
        ),
        (["--overwrite_output_dir", "--pretrained_model_name_or_path", str(unknown_class)], "not supported"),
        (["--overwrite_output_dir", "--num_inference_steps", "none", "--truncate_steps", "5"], "truncate_steps"),
        (["--overwrite_output_dir", "--truncate_steps", "5"], "truncate_steps"),
        (["--overwrite_output_dir", "--reg_order", "1"], "reg_order"),
        (["--overwrite_output_dir", "--resolution", "16"], "resolution"),
        (["--overwrite_output_dir", "--prompts", str(malformed)], "line 3"),
        (["--overwrite_output_dir", "--prompts", str(empty)], "holds no prompts"),
        (["--overwrite_output_dir", "--validation_prompts", "42"], "outside"),
        (["--overwrite_output_dir", "--use_8bit_adam"], "bitsandbytes"),
        (["--overwrite_output_dir", "--lora_target_modules", "no_such_module"], "no_such_module"),
    ]
    for extra, message in cases:
        args = tiny_args(tiny_base, out) + extra
        with monkeypatch.context() as patch:
            if "--use_8bit_adam" in extra:  # bitsandbytes is in the test extra: hide it (`import` raises ImportError)
                patch.setitem(sys.modules, "bitsandbytes", None)
            assert script.main(args) == 2, extra
        err = capsys.readouterr().err
        assert message in err, (extra, err)
        assert snapshot(out) == before, extra


# -- multi-process and the embedded default --------------------------------------------------------------
def test_accelerate_launch_two_processes(tiny_base, tmp_path):
    # accelerate 1.15 spawns several CPU processes for `--cpu` only through mpirun; torchrun's launcher
    # (`--multi_gpu`) with ACCELERATE_USE_CPU=1 gives the same gloo MULTI_CPU run without MPI.
    from diffusers_am.models import EMBEDDED_DIGITS_BASE

    base = EMBEDDED_DIGITS_BASE if (EMBEDDED_DIGITS_BASE / "model_index.json").is_file() else tiny_base
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
    }
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "train_adjoint_matching.py"),
        *tiny_args(base, out, "--checkpointing_steps", "2", "--method", "ode-am", *VALUES),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reward before:") == 1  # one summary: only the main process prints and writes
    records = read_log(out)
    assert [r["step"] for r in records] == [1, 2]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    ckpt = out / "checkpoint-2"
    assert (ckpt / "rng_state_0.safetensors").is_file() and (ckpt / "rng_state_1.safetensors").is_file()
    # (the trainer itself raises if the ranks' LoRA weights differ at the end)
    # 2 processes x 1 micro-batch average the same gradients as 1 process x 2 accumulated micro-batches (VALUES:
    # the adapters compare the gradients' values)
    single = tmp_path / "single"
    assert script.main(tiny_args(base, single, "--gradient_accumulation_steps", "2", *VALUES)) == 0
    a, b = load_file(out / "pytorch_lora_weights.safetensors"), load_file(single / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert [r["reward_mean"] for r in records] == pytest.approx([r["reward_mean"] for r in read_log(single)], abs=1e-5)


def test_default_run_on_embedded_base_raises_the_reward(tmp_path):
    from diffusers_am.models import EMBEDDED_DIGITS_BASE

    if not (EMBEDDED_DIGITS_BASE / "model_index.json").is_file():
        pytest.skip("the embedded digits base is not in this checkout")
    out = tmp_path / "default"
    # the default run (ODE-AM, K=4 of N=20, lambda=10), shortened to 30 updates and 50 evaluation samples
    assert (
        script.main(
            [
                "--output_dir",
                str(out),
                "--max_train_steps",
                "30",
                "--num_eval_samples",
                "50",
                "--validation_steps",
                "0",
                "--report_to",
                "none",
            ]
        )
        == 0
    )
    assert (out / "pytorch_lora_weights.safetensors").is_file() and len(read_log(out)) == 30
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["reward_after"] > summary["reward_before"] + 0.02, summary


def test_validation_logs_held_out_reward_diversity_and_coverage(tiny_base, tmp_path):
    out = tmp_path / "val"
    rc = run(
        tiny_base, out, "--validation_steps", "1", "--max_train_steps", "2", "--num_validation_images", "4",
        "--validation_prompts", "1", "3", "7",
        "--validation_reward", "digits-heldout", "--validation_features", "digits-heldout",
    )
    assert rc == 0
    records = [json.loads(line) for line in (out / "validation_log.jsonl").read_text().splitlines()]
    assert [r["model"] for r in records] == ["base", "fine-tuned", "fine-tuned"]
    assert [r["step"] for r in records] == [0, 1, 2]
    base, last = records[0], records[-1]
    assert "recall" not in base and "heldout_reward" in base
    for key in ("heldout_reward", "recall", "coverage"):
        assert isinstance(last[key], float) and last[key] == last[key]
    assert any(k.startswith("diversity/") for k in last)
    assert 0.0 <= last["recall"] <= 1.0 and 0.0 <= last["coverage"] <= 1.0
    assert last["heldout_reward"] <= 0.0  # a log-probability


def test_unknown_validation_reward_is_refused(tiny_base, tmp_path, capsys):
    rc = run(tiny_base, tmp_path / "bad", "--validation_reward", "no-such-reward")
    assert rc == 2
    assert "unknown reward" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
