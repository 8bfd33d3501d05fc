"""FSDP2 through accelerate on 2 CPU processes (gloo): equal to 1 process with gradient accumulation, and
checkpoints (LoRA gathered for saving, sharded optimizer), resume, the EMA and a stop signal work under it."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from _dist_cpu import ADAPTER, REPO, engine_env, max_diff, one_run, two_process_cmd, two_process_run

# the digits (DiT) forward calls a block's timestep embedder outside the block: shard the whole model
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "NO_WRAP",
            "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_CPU_DUMP_AFTER": "240"}

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_available() or not __import__("torch").distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def fsdp_run(out, *flags: str, state_dict: str = "SHARDED_STATE_DICT") -> None:
    """2 CPU processes under FSDP2; accelerate saves the model and optimizer in checkpoints as ``state_dict``
    (``SHARDED_STATE_DICT`` or ``FULL_STATE_DICT``)."""
    two_process_run(out, {**FSDP_ENV, "FSDP_STATE_DICT_TYPE": state_dict}, *flags)


@pytest.fixture(scope="module")
def one_proc_4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    one_run(out, "--max_train_steps", "4")
    return out


@pytest.fixture(scope="module")
def fsdp_4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "run"
    fsdp_run(out, "--max_train_steps", "4")
    return out


def test_fsdp2_two_cpu_processes_match_one_process_accumulation(fsdp_4, one_proc_4):
    from safetensors.torch import load_file

    assert max_diff(fsdp_4 / ADAPTER, one_proc_4 / ADAPTER) <= 1e-5
    assert max(float(v.abs().max()) for k, v in load_file(str(fsdp_4 / ADAPTER)).items() if "lora_B" in k) > 0


def test_fsdp2_checkpoint_and_resume_match_a_straight_run(tmp_path, fsdp_4, one_proc_4):
    from diffusers_am.training.checkpoints import checkpoint_problem

    out = tmp_path / "run"
    fsdp_run(out, "--max_train_steps", "2", "--checkpointing_steps", "2")
    checkpoint = out / "checkpoint-2"
    assert checkpoint_problem(checkpoint, allow_pickle=True) is None  # sealed with the checksums of every file
    # the adapter (gathered from both shards) and accelerate's sharded optimizer state
    assert max_diff(checkpoint / ADAPTER, out / ADAPTER) == 0
    assert sorted(p.name for p in (checkpoint / "optimizer_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    fsdp_run(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert max_diff(out / ADAPTER, fsdp_4 / ADAPTER) <= 1e-5
    assert max_diff(out / ADAPTER, one_proc_4 / ADAPTER) <= 1e-5


def test_fsdp2_ema_is_saved_checkpointed_and_resumed_like_one_process(tmp_path):
    out, one = tmp_path / "fsdp", tmp_path / "one"  # and accelerate's full (unsharded) model and optimizer files
    fsdp_run(out, "--max_train_steps", "1", "--checkpointing_steps", "1", "--use_ema", state_dict="FULL_STATE_DICT")
    fsdp_run(out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--use_ema", "--resume_from_checkpoint",
             "latest", state_dict="FULL_STATE_DICT")
    assert {"optimizer.bin", "pytorch_model_fsdp.bin"} <= {f.name for f in (out / "checkpoint-1").iterdir()}
    one_run(one, "--max_train_steps", "2", "--use_ema", "--checkpointing_steps", "1")
    assert max_diff(out / ADAPTER, one / ADAPTER) <= 1e-5  # the EMA weights, resumed from the EMA state of update 1
    for step in (1, 2):  # the checkpoints hold the full trained LoRA (gathered from both shards)
        for name in (ADAPTER, "trainable_params.safetensors"):
            assert max_diff(out / f"checkpoint-{step}" / name, one / f"checkpoint-{step}" / name) <= 1e-5
    assert max_diff(out / ADAPTER, out / "checkpoint-2" / ADAPTER) > 1e-4  # the EMA, not the trained weights


SLOW_REWARD = """
import time

from diffusers_am.rewards import load_reward

_digits = load_reward("digits")


def reward(images, prompts):
    time.sleep(0.3)
    return _digits(images, prompts)
"""


def test_fsdp2_sigint_saves_a_checkpoint_and_the_adapter(tmp_path):
    import psutil

    from diffusers_am.training.checkpoints import checkpoint_problem, list_checkpoints

    (tmp_path / "slow_reward.py").write_text(SLOW_REWARD)
    out = tmp_path / "run"
    cmd = two_process_cmd(out, "--max_train_steps", "40", "--num_eval_samples", "0", "--reward",
                          f"{tmp_path / 'slow_reward.py'}:reward")
    env = engine_env({**FSDP_ENV, "PYTHONPATH": str(REPO)})
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log, deadline = out / "train_log.jsonl", time.monotonic() + 240
    while not (log.is_file() and log.read_text().strip()):
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate(timeout=60)
        time.sleep(0.05)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
               if any("_fsdp_cpu_launch.py" in part for part in p.cmdline())]
    assert len(workers) == 2
    for worker in workers:  # Ctrl-C in a terminal reaches every process of the job
        worker.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=240)
    assert launcher.returncode != 0
    stopped = json.loads(log.read_text().splitlines()[-1])["step"]
    assert 1 <= stopped < 40
    assert err.count(f"stopped by SIGINT after update {stopped} of 40: saved {out / f'checkpoint-{stopped}'}") == 1
    assert [s for s, _ in list_checkpoints(out)] == [stopped]
    assert checkpoint_problem(out / f"checkpoint-{stopped}", allow_pickle=True) is None
    assert max_diff(out / ADAPTER, out / f"checkpoint-{stopped}" / ADAPTER) == 0  # no EMA: the same weights
