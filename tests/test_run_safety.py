"""Nothing a user owns is lost: output-folder ownership and the lock, interrupts (real signals to a real
trainer process), checkpoint checksums, full disks, strict configs and JSON, one-line errors.

Full disks are simulated: ``shutil.disk_usage`` is monkeypatched to report little free space (the trainer
checks it at set-up and before each checkpoint), and writes are made to raise ``OSError(ENOSPC)`` the way a
full disk does (the checkpoint's save hook, the final adapter write). Read-only folders are simulated by
making the trainer's write probe (``tempfile.mkstemp`` in ``diffusers_am.training.disk``) raise EACCES:
tests may run as root, where permissions do not stop writes.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _run_helpers import _fresh_accelerate_state, read_log, run, snapshot, tiny_args, tiny_base  # noqa: E402,F401
from diffusers_am.training import disk  # noqa: E402
from diffusers_am.training.checkpoints import CheckpointManager, list_checkpoints  # noqa: E402
from diffusers_am.training.run_folder import FolderLock  # noqa: E402
from diffusers_am.training.layout import LOCK_NAME, MARKER_NAME
from diffusers_am.training.run_folder import RunFolder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

SLOW_REWARD = """
import os
import time

from diffusers_am.rewards import load_reward

_digits = load_reward("digits")


def reward(images, prompts):
    if images.shape[0] == 3:  # training batches: slow only where the test asks (a subprocess to signal)
        time.sleep(float(os.environ.get("SLOW_REWARD_SECONDS", "0")))
    return _digits(images, prompts)
"""

BAD_REWARDS = """
import torch


def scalar(images, prompts):
    return images.mean()


def as_list(images, prompts):
    return images.mean(dim=(1, 2, 3)).tolist()


def detached(images, prompts):
    return images.mean(dim=(1, 2, 3)).detach()


def always_nan(images, prompts):
    return images.mean(dim=(1, 2, 3)) * float("nan")


def crash_in_training(images, prompts):
    if images.shape[0] == 3:
        raise RuntimeError("the reward server went away")
    return images.mean(dim=(1, 2, 3))
"""


@pytest.fixture(scope="module")
def rewards_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewards")
    (folder / "slow_reward.py").write_text(SLOW_REWARD)
    (folder / "bad_rewards.py").write_text(BAD_REWARDS)
    return folder


def messages(text: str) -> list[str]:
    """The lines of stderr that are not progress bars."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "it/s" not in line]


def last_line(text: str) -> str:
    lines = messages(text)
    return lines[-1] if lines else ""


def strict_json(path: Path):
    def refuse(constant):
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# -- output folders --------------------------------------------------------------------------------------
def test_folder_that_is_not_a_run_is_refused_even_with_overwrite(tiny_base, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    before = snapshot(project)
    for extra in ([], ["--overwrite_output_dir"]):
        assert run(tiny_base, project, *extra) == 2
        err = capsys.readouterr().err
        assert len(messages(err)) == 1 and "is not empty (README.md) and holds no diffusers-am run" in err
        assert snapshot(project) == before and sorted(p.name for p in project.iterdir()) == ["README.md"]
    assert run(tiny_base, project / "README.md") == 2
    assert "is a file; pass a folder" in capsys.readouterr().err
    assert snapshot(project) == before


def test_read_only_or_full_output_dir_is_refused_at_setup(tiny_base, tmp_path, monkeypatch, capsys):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(disk.tempfile, "mkstemp", read_only)
        assert run(tiny_base, tmp_path / "ro") == 2
    assert "is not writable (Permission denied)" in capsys.readouterr().err
    with monkeypatch.context() as patch:
        patch.setattr(disk.shutil, "disk_usage", lambda path: disk.shutil._ntuple_diskusage(10**9, 10**9, 1000))
        assert run(tiny_base, tmp_path / "full") == 2
    err = capsys.readouterr().err
    assert "has 1000 B free; this run (a checkpoint, the adapter, grids and logs) needs about" in err
    assert len(messages(err)) == 1 and not (tmp_path / "ro").exists() and not (tmp_path / "full").exists()


def test_run_folder_owns_only_what_it_wrote(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    folder = RunFolder.claim(out)
    assert (out / LOCK_NAME).is_file() and folder.created == [tmp_path / "new", out]
    folder.release()
    assert not (tmp_path / "new").exists()  # nothing written: the folders it created are gone again

    folder = RunFolder.claim(out)
    folder.start(["a.txt", "sub"], fresh=True)
    (out / "a.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="holds 'notes.txt', which this trainer did not write"):
        folder.check_unowned(["notes.txt"])
    folder.record("checkpoint-1")
    (out / "checkpoint-1").mkdir()
    folder.release()
    assert json.loads((out / MARKER_NAME).read_text())["entries"] == ["a.txt", "checkpoint-1", "sub"]

    folder = RunFolder.claim(out)  # a marked folder is a run: claimed although it is not empty
    assert sorted(folder.start(["b.txt"], fresh=True)) == ["a.txt", "checkpoint-1", "sub"]
    folder.release()
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "notes.txt"] and folder.owned == ["b.txt"]


def test_lock_names_a_live_holder_and_takes_over_a_stale_one(tmp_path, capsys):
    lock = FolderLock(tmp_path / "x.lock").acquire()
    with pytest.raises(ValueError, match=rf"in use by another trainer \(pid {os.getpid()} on host "):
        FolderLock(tmp_path / "x.lock").acquire()
    lock.release()
    assert not (tmp_path / "x.lock").exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    (tmp_path / "x.lock").write_text(json.dumps({"pid": dead.pid, "host": host, "started": "earlier"}))
    lock = FolderLock(tmp_path / "x.lock").acquire()
    assert f"took over the stale lock {str(tmp_path / 'x.lock')!r} of pid {dead.pid} on host {host}" in (
        capsys.readouterr().err
    )
    assert json.loads((tmp_path / "x.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_second_trainer_exits_at_once_naming_the_holder(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_base, out, "--max_train_steps", "1", "--checkpointing_steps", "1", "--num_eval_samples", "0") == 0
    capsys.readouterr()
    before = snapshot(out)
    holder = FolderLock(out / LOCK_NAME).acquire()
    try:
        assert run(tiny_base, out, "--resume_from_checkpoint", "latest", "--max_train_steps", "2") == 2
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and f"is in use by another trainer (pid {os.getpid()} on host" in err
    assert snapshot(out) == before


def test_overwrite_removes_old_outputs_at_setup_and_keeps_user_files(tiny_base, tmp_path, rewards_dir, capsys):
    out = tmp_path / "run"
    assert run(tiny_base, out, "--num_eval_samples", "0", "--checkpointing_steps", "1") == 0
    (out / "notes.txt").write_text("the user's notes")
    assert run(tiny_base, out) == 2
    assert "already holds a run" in capsys.readouterr().err
    crash = f"{rewards_dir / 'bad_rewards.py'}:crash_in_training"
    assert run(tiny_base, out, "--overwrite_output_dir", "--reward", crash, "--num_eval_samples", "0") == 1
    assert "RuntimeError: the reward server went away" in capsys.readouterr().err  # a crash in the user's code
    names = sorted(p.name for p in out.iterdir())
    assert names == [MARKER_NAME, "notes.txt", "training_config.json", "validation"], names  # no old adapter, card
    assert json.loads((out / "training_config.json").read_text())["reward"] == crash
    assert not (out / LOCK_NAME).exists()  # released after the crash too


# -- interrupts: a real trainer process, real signals ------------------------------------------------------
def start_trainer(base, out, reward, steps):
    env = {**os.environ, "SLOW_REWARD_SECONDS": "0.25", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffusers_am.train", *tiny_args(base, out, "--reward", reward, "--max_train_steps",
                                                                  str(steps), "--num_eval_samples", "0")]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_updates(proc, out, n=1, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = out / "train_log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the trainer did not log an update in time")


def test_sigint_stops_after_the_update_and_resume_matches_a_straight_run(tiny_base, tmp_path, rewards_dir, capsys):
    out, steps = tmp_path / "run", 6
    reward = f"{rewards_dir / 'slow_reward.py'}:reward"
    proc = start_trainer(tiny_base, out, reward, steps)
    wait_for_updates(proc, out)
    # a second trainer on the same folder meanwhile: one line naming the holder, nothing touched
    assert run(tiny_base, out, "--reward", reward, "--max_train_steps", str(steps), "--num_eval_samples", "0") == 2
    assert f"is in use by another trainer (pid {proc.pid} on host" in capsys.readouterr().err
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    stopped = read_log(out)[-1]["step"]
    assert 1 <= stopped < steps
    assert last_line(err) == (
        f"stopped by SIGINT after update {stopped} of {steps}: saved {out / f'checkpoint-{stopped}'} and the adapter "
        f"so far ({out / 'pytorch_lora_weights.safetensors'}); to continue, run the same command with "
        "`--resume_from_checkpoint latest`."
    )
    assert [s for s, _ in list_checkpoints(out)] == [stopped] and not (out / LOCK_NAME).exists()
    so_far = load_file(out / "pytorch_lora_weights.safetensors")
    assert so_far.keys() == load_file(out / f"checkpoint-{stopped}" / "pytorch_lora_weights.safetensors").keys()

    common = ("--reward", reward, "--max_train_steps", str(steps), "--num_eval_samples", "0")
    assert run(tiny_base, out, *common, "--resume_from_checkpoint", "latest") == 0
    straight = tmp_path / "straight"
    assert run(tiny_base, straight, *common) == 0
    a, b = load_file(out / "pytorch_lora_weights.safetensors"), load_file(straight / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert [r["step"] for r in read_log(out)] == list(range(1, steps + 1))
    assert [r["reward_mean"] for r in read_log(out)] == pytest.approx([r["reward_mean"] for r in read_log(straight)])


def test_sigterm_stops_with_exit_143_and_a_checkpoint(tiny_base, tmp_path, rewards_dir):
    out = tmp_path / "run"
    proc = start_trainer(tiny_base, out, f"{rewards_dir / 'slow_reward.py'}:reward", 20)
    wait_for_updates(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    stopped = read_log(out)[-1]["step"]
    assert last_line(err).startswith(f"stopped by SIGTERM after update {stopped} of 20: saved ")
    assert "Traceback" not in err and [s for s, _ in list_checkpoints(out)] == [stopped]
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "README.md").exists()


def test_two_processes_stop_at_the_same_update_when_one_is_signalled(tiny_base, tmp_path, rewards_dir):
    # accelerate's torchrun launcher with ACCELERATE_USE_CPU=1 gives a gloo MULTI_CPU run (as in test_trainer_run)
    import psutil

    out = tmp_path / "ddp"
    env = {**os.environ, "SLOW_REWARD_SECONDS": "0.25", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "train_adjoint_matching.py"),
           *tiny_args(tiny_base, out, "--reward", f"{rewards_dir / 'slow_reward.py'}:reward", "--max_train_steps", "30",
                      "--num_eval_samples", "0")]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_updates(launcher, out, timeout=240)
    main_pid = json.loads((out / LOCK_NAME).read_text())["pid"]  # only the main process holds the lock
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
               if any("train_adjoint_matching.py" in part for part in p.cmdline())]
    others = [p for p in workers if p.pid != main_pid]
    assert len(workers) == 2 and len(others) == 1, [p.cmdline() for p in workers]
    others[0].send_signal(signal.SIGTERM)  # only rank 1 is told to stop
    _, err = launcher.communicate(timeout=240)
    assert launcher.returncode != 0
    stopped = read_log(out)[-1]["step"]
    assert 1 <= stopped < 30
    assert err.count(f"stopped by SIGTERM after update {stopped} of 30: saved ") == 1  # printed by the main process
    checkpoint = out / f"checkpoint-{stopped}"  # both ranks wrote their part of the same update's checkpoint
    assert (checkpoint / "rng_state_0.safetensors").is_file() and (checkpoint / "rng_state_1.safetensors").is_file()
    assert [s for s, _ in list_checkpoints(out)] == [stopped] and not (out / LOCK_NAME).exists()


def test_stop_signals_defer_ignore_a_forwarded_duplicate_and_abort_on_a_second_ctrl_c(monkeypatch, capsys):
    from diffusers_am.training import stopping

    clock = [100.0]
    monkeypatch.setattr(stopping.time, "monotonic", lambda: clock[0])
    previous = signal.getsignal(signal.SIGINT)
    with stopping.StopSignals() as signals:
        with pytest.raises(stopping.Interrupted) as info:  # outside the updates there is nothing to finish
            signal.raise_signal(signal.SIGTERM)
        assert info.value.signum == signal.SIGTERM
        with signals.deferred():
            signal.raise_signal(signal.SIGINT)
            assert signals.requested == signal.SIGINT
            assert "SIGINT received: stopping after the current update" in capsys.readouterr().err
            clock[0] += 0.01
            signal.raise_signal(signal.SIGINT)  # the launcher forwarding the same Ctrl-C: ignored
            signal.raise_signal(signal.SIGTERM)  # a launcher's follow-up SIGTERM: ignored
            clock[0] += 2.0
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C
                signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_resume_advice_never_goes_in_a_circle(tiny_base, tmp_path, rewards_dir, capsys):
    out = tmp_path / "run"
    crash = f"{rewards_dir / 'bad_rewards.py'}:crash_in_training"
    assert run(tiny_base, out, "--reward", crash, "--num_eval_samples", "0") == 1  # before its first checkpoint
    assert "RuntimeError" in capsys.readouterr().err
    (out / "train_log.jsonl").write_text('{"step": 1}\n')  # as if one update had been logged
    assert run(tiny_base, out, "--num_eval_samples", "0") == 2
    err = capsys.readouterr().err
    assert "it has no checkpoint to resume from; pass `--overwrite_output_dir` to start over" in err
    assert run(tiny_base, out, "--resume_from_checkpoint", "latest") == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "pass `--overwrite_output_dir` instead of" in err
    assert run(tiny_base, out, "--overwrite_output_dir", "--num_eval_samples", "0") == 0


# -- checkpoint integrity and full disks -------------------------------------------------------------------
def damage_tensor_bytes(path: Path) -> None:
    """Flip the last bytes of a safetensors file: the header still parses, the values are garbage."""
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff\x7f\xff\x7f\xff\x7f\xff\x7f"
    path.write_bytes(bytes(data))


def test_damaged_checkpoint_is_named_and_latest_falls_back(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--checkpointing_steps", "1", "--num_eval_samples", "0")
    assert run(tiny_base, out, "--max_train_steps", "3", *args) == 0
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert len(state["files"]["trainable_params.safetensors"]["sha256"]) == 64 and state["config"]["rank"] == 2
    damage_tensor_bytes(out / "checkpoint-3" / "trainable_params.safetensors")
    capsys.readouterr()
    assert run(tiny_base, out, "--max_train_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-3"), *args) \
        == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1
    assert "checkpoint-3' is damaged (trainable_params.safetensors does not match its recorded sha256)" in err
    assert run(tiny_base, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *args) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: checkpoint {str(out / 'checkpoint-3')!r} is damaged (trainable_params.safetensors does not match "
        "its recorded sha256); resuming from checkpoint-2, the newest intact one." in err
    )
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]
    assert [s for s, _ in list_checkpoints(out)] == [1, 2, 3, 4]  # checkpoint-3 rewritten intact
    rewritten = load_file(out / "checkpoint-3" / "trainable_params.safetensors")
    assert all(torch.isfinite(t).all() for t in rewritten.values())


def test_full_disk_keeps_the_last_good_checkpoint(tiny_base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    low = []  # free-space readings to report before the real ones (1000 B: a full disk)
    real_usage = disk.shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=low.pop() if low else 10**12))
    original = CheckpointManager._save_hook
    saves = []

    def hook(self, models, weights, output_dir):
        saves.append(output_dir)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")  # checkpoint-2: the disk fills while writing
        original(self, models, weights, output_dir)
        if len(saves) == 3:
            low.append(1000)  # checkpoint-4 then finds too little space

    monkeypatch.setattr(CheckpointManager, "_save_hook", hook)
    assert run(tiny_base, out, "--max_train_steps", "5", "--checkpointing_steps", "1", "--num_eval_samples", "0") == 0
    err = capsys.readouterr().err
    assert (
        f"warning: checkpoint-2 was not saved (No space left on device); the last good checkpoint is still "
        f"{str(out / 'checkpoint-1')!r}; training goes on." in err
    )
    assert f"warning: checkpoint-4 was not saved (1000 B free on the disk of {str(out)!r}, " in err
    assert [s for s, _ in list_checkpoints(out)] == [1, 3, 5] and not list(out.glob(".tmp-checkpoint-*"))

    # the final adapter write fails: exit 1, one line naming the last checkpoint, which stays intact
    from diffusers_am.training import outputs

    def full(ctx):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "save_adapter", full)
    again = tmp_path / "again"
    assert run(tiny_base, again, "--max_train_steps", "3", "--checkpointing_steps", "2", "--num_eval_samples", "0") == 1
    err = capsys.readouterr().err
    assert last_line(err) == (
        f"error: could not write into {str(again)!r} during final outputs at update 3 (No space left on device); "
        f"free some space, then: the last complete checkpoint is {again / 'checkpoint-2'}: to continue from it, run "
        "the same command with `--resume_from_checkpoint latest`. Each checkpoint also holds its adapter "
        "(pytorch_lora_weights.safetensors)."
    )
    assert not (again / "pytorch_lora_weights.safetensors").exists() and not (again / LOCK_NAME).exists()
    monkeypatch.undo()
    assert run(tiny_base, again, "--max_train_steps", "3", "--resume_from_checkpoint", "latest") == 0


def test_write_failures_are_recognised(tmp_path):
    assert disk.write_failure(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == "No space left on device"
    assert disk.write_failure(OSError(errno.ENOENT, "No such file"), tmp_path) is None  # not a write problem
    safetensors_error = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk.write_failure(safetensors_error, tmp_path) == os.strerror(28)
    torch_save_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert disk.write_failure(torch_save_error, tmp_path).startswith("the file write failed with ")
    assert disk.write_failure(RuntimeError("a bug"), tmp_path) is None


# -- strict config, resume rules, strict JSON ----------------------------------------------------------------
def test_resume_refuses_fixed_options_and_applies_a_new_learning_rate(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--checkpointing_steps", "2", "--num_eval_samples", "0")
    assert run(tiny_base, out, *args) == 0
    capsys.readouterr()
    before = snapshot(out)
    for extra, line in (
        (["--rank", "4"], "`--rank` was 2 in"),
        (["--rank", "4"], "and is 4 now; it cannot change when resuming: pass `--rank 2`, or start a new run"),
        (["--method", "draft"], "`--method` was 'ode-am' in"),
        (["--seed", "1"], "`--seed` was 0 in"),
        (["--max_train_steps", "1"], "`--max_train_steps` 1 is below update 2"),
    ):
        assert run(tiny_base, out, *args, "--resume_from_checkpoint", "latest", *extra) == 2
        err = capsys.readouterr().err
        assert len(messages(err)) == 1 and line in err, err
        assert snapshot(out) == before
    assert run(tiny_base, out, *args, "--resume_from_checkpoint", "latest", "--max_train_steps", "4",
               "--learning_rate", "0.01") == 0
    assert [r["lr"] for r in read_log(out)] == pytest.approx([3e-3, 3e-3, 0.01, 0.01])
    assert json.loads((out / "training_config.json").read_text())["learning_rate"] == 0.01
    assert "| learning rate | 0.003 (updates 1-2), 0.01 (updates 3-4) (constant) |" in (out / "README.md").read_text()
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["lr_history"] == [[1, 0.003], [3, 0.01]] and state["config"]["learning_rate"] == 0.01


def test_every_reward_nan_still_writes_strict_json(tiny_base, tmp_path, rewards_dir, caplog):
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="diffusers_am"):  # every update skipped: exit 3, no adapter (17B)
        assert run(tiny_base, out, "--reward", f"{rewards_dir / 'bad_rewards.py'}:always_nan") == 3
    assert any("skipping this update" in r.getMessage() for r in caplog.records)
    for name in ("training_config.json", ".diffusers-am-run.json"):
        strict_json(out / name)
    lines = (out / "train_log.jsonl").read_text().splitlines()
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in train_log.jsonl"))
    assert len(lines) == 2 and not (out / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize(
    "reward, line",
    [
        ("scalar", "must return one value per image, shape [2]; it returned shape []."),
        ("as_list", "must return a torch.Tensor of shape [2] (one value per image); it returned a list."),
        ("detached", "is not differentiable in the images"),
    ],
)
def test_reward_breaking_the_contract_is_one_line_before_any_write(tiny_base, tmp_path, rewards_dir, capsys, reward,
                                                                    line):
    assert run(tiny_base, tmp_path / "run", "--reward", f"{rewards_dir / 'bad_rewards.py'}:{reward}") == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and line in err and not (tmp_path / "run").exists()


def test_other_user_mistakes_are_one_line_with_nothing_written(tiny_base, tmp_path, capsys):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(bytes(range(256)))
    cases = [
        (["--prompts", str(binary)], f"`--prompts` file {str(binary)!r} is not UTF-8 text"),
        (["--push_to_hub"], "`--push_to_hub`: the Hub is offline here (HF_HUB_OFFLINE is set)"),
        (["--lora_alpha", "0"], "`--lora_alpha` must be > 0"),
    ]
    for extra, line in cases:
        assert run(tiny_base, tmp_path / "run", *extra) == 2
        err = capsys.readouterr().err
        assert len(messages(err)) == 1 and line in err, (extra, err)
        assert not (tmp_path / "run").exists()
    for extra, line in (  # argparse's own errors: one line too, exit code 2
        (["--seed", "1.5"], "error: argument --seed: invalid int value: '1.5'"),
        (["--use_ema", "maybe"], "error: `--use_ema` must be true or false (also yes/no, 1/0); got 'maybe'."),
    ):
        with pytest.raises(SystemExit) as exit_info:
            run(tiny_base, tmp_path / "run", *extra)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(messages(err)) == 1 and err.startswith(line), err


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_values_are_strict(tmp_path, suffix):
    from diffusers_am.training.config import TrainingConfig, parse_args

    def config(**values):
        path = tmp_path / f"c{suffix}"
        if suffix == ".json":
            path.write_text(json.dumps(values))
        else:
            import yaml

            path.write_text(yaml.safe_dump(values))
        return parse_args(["--config", str(path)])

    assert config(use_ema="no").use_ema is False and config(use_ema="YES").use_ema is True
    assert config(use_ema=1).use_ema is True and config(gradient_checkpointing="False").gradient_checkpointing is False
    assert config(learning_rate="1e-3").learning_rate == 1e-3 and config(rank="4").rank == 4
    assert config(mixed_precision=False).mixed_precision == "no"  # YAML's reading of `mixed_precision: no`
    for values, line in (
        ({"use_ema": "nope"}, "`--use_ema` must be true or false"),
        ({"use_ema": 2}, "`--use_ema` must be true or false"),
        ({"seed": 1.5}, "`--seed` must be an integer; got 1.5"),
        ({"max_train_steps": True}, "`--max_train_steps` must be an integer; got True"),
        ({"learning_rate": "fast"}, "`--learning_rate` must be a number; got 'fast'"),
        ({"reward_scale": "inf"}, "`--reward_scale` must be a finite number"),
        ({"lora_alpha": 0}, "`--lora_alpha` must be > 0"),
        ({"seed": -1}, "`--seed` must be an integer >= 0"),
        ({"reward": 5}, "`--reward` must be a string; got 5"),
    ):
        with pytest.raises(ValueError) as err:
            config(**values)
        assert line in str(err.value), (values, str(err.value))
    with pytest.raises(ValueError, match="must be a finite number"):
        TrainingConfig(adam_weight_decay=float("nan"))


def test_cli_booleans(capsys):
    from diffusers_am.training.config import parse_args

    assert parse_args(["--use_ema"]).use_ema is True and parse_args(["--no-use_ema"]).use_ema is False
    for word, value in (("yes", True), ("No", False), ("1", True), ("0", False), ("TRUE", True), ("false", False)):
        assert parse_args(["--use_ema", word, "--method", "draft"]).use_ema is value
    with pytest.raises(SystemExit):
        parse_args(["--push_to_hub", "me/repo"])
    assert capsys.readouterr().err.startswith("error: `--push_to_hub` must be true or false")


def test_strict_json_helper():
    from diffusers_am.jsonio import dumps

    text = dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": torch.tensor([2.0, float("-inf")])})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": [2.0, None]} and "NaN" not in text
