"""Reliability: the probes of issue 17 (nothing lost, nothing executed) kept as regression tests.

Each test reproduces a fault a user hit: a run marker or lock file that points outside the output folder, a
shared checkpoint carrying a pickle, a signal while the final outputs are written or while a resumed run sets
up, renamed or edited checkpoints, a torn log line, a reward failing mid-run, a kill during validation. Where
a signal or a kill is involved the trainer runs in a subprocess. Read-only folders are simulated (tests may
run as root): the failing call raises EACCES the way a read-only folder makes it.
"""

import errno
import json
import os
import pathlib
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _run_helpers import _fresh_accelerate_state, read_log, run, snapshot, tiny_args, tiny_base  # noqa: E402,F401
from diffusers_am.training.checkpoints import list_checkpoints  # noqa: E402
from diffusers_am.training.run_folder import FolderLock  # noqa: E402
from diffusers_am.training.layout import LOCK_NAME, MARKER_NAME
from diffusers_am.training.run_folder import RunFolder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("--num_eval_samples", "0")

REWARDS = """
import os
import time
from pathlib import Path

from diffusers_am.rewards import load_reward

_digits = load_reward("digits")

if os.environ.get("SLOW_IMPORT_FLAG"):  # a slow set-up: the test signals the trainer meanwhile
    Path(os.environ["SLOW_IMPORT_FLAG"]).write_text("importing")
    time.sleep(60)


def _count(kind):
    # calls of one kind, counted in a file named by the test (in-process runs import this module once)
    path = Path(os.environ["CALLS_FILE"])
    counts = {} if not path.is_file() else dict(line.split() for line in path.read_text().splitlines())
    counts[kind] = str(int(counts.get(kind, 0)) + 1)
    path.write_text("".join(f"{k} {v}\\n" for k, v in counts.items()))
    return int(counts[kind])


def reward(images, prompts):
    if images.shape[0] == 3 and os.environ.get("FAIL_AT_UPDATE"):  # training batches: update n's reward fails
        if _count("train") == int(os.environ["FAIL_AT_UPDATE"]):
            if os.environ.get("FAIL_HOW") == "value":
                raise ValueError("the reward got prompts it cannot score")
            raise RuntimeError("the reward server went away")
    if images.shape[0] == 5 and os.environ.get("SLOW_FINAL_FLAG"):  # the evaluation: base (1st), final (2nd)
        if _count("eval") == 2:
            Path(os.environ["SLOW_FINAL_FLAG"]).write_text("final outputs")
            time.sleep(60)
    return _digits(images, prompts)


def held_out(images, prompts):
    # calls: the set-up's contract check, the base grid, then update 1's grid (3rd)
    if os.environ.get("SLOW_VALIDATION_FLAG") and _count("validation") == 3:
        Path(os.environ["SLOW_VALIDATION_FLAG"]).write_text("validating")
        time.sleep(60)
    return images.mean(dim=(1, 2, 3))
"""


@pytest.fixture(scope="module")
def rewards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rewards")
    (folder / "rewards.py").write_text(REWARDS)
    return folder / "rewards.py"


@pytest.fixture(autouse=True)
def _calls_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CALLS_FILE", str(tmp_path / "calls.txt"))


def messages(text: str) -> list[str]:
    """The lines of stderr that are not progress bars."""
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip() and "it/s" not in line]


def last_line(text: str) -> str:
    lines = messages(text)
    return lines[-1] if lines else ""


def trainer_process(base, out, *extra, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "diffusers_am.train", *tiny_args(base, out, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_file(proc, path: Path, timeout=180):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path.name} never appeared: {proc.communicate()}")
        time.sleep(0.05)


def rewrite_state(checkpoint: Path, **changes) -> None:
    """Edit a checkpoint's trainer_state.json as a user (or an attacker) could."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    state.update(changes)
    path.write_text(json.dumps(state))


def record_file(checkpoint: Path, name: str) -> None:
    """Add ``name``'s checksum to trainer_state.json, as someone planting the file would."""
    import hashlib

    data = (checkpoint / name).read_bytes()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


# -- 1. the run marker names only the folder's own children ---------------------------------------------------
def test_marker_entries_outside_the_folder_are_refused_before_anything_is_removed(tiny_base, tmp_path, capsys):
    out = tmp_path / "out" / "r1"
    assert run(tiny_base, out, *QUICK) == 0
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "precious.txt").write_text("the user's")
    (out / "notes.txt").write_text("the user's too")
    marker = json.loads((out / MARKER_NAME).read_text())
    capsys.readouterr()
    for bad in ("../../decoy", str(decoy), ".", "..", "validation/../../../decoy", "", "a\0b", 7):
        (out / MARKER_NAME).write_text(json.dumps({**marker, "entries": marker["entries"] + [bad]}))
        before = snapshot(tmp_path)
        assert run(tiny_base, out, "--overwrite_output_dir", *QUICK) == 2
        err = capsys.readouterr().err
        assert len(messages(err)) == 1, err
        assert f"the run marker {str(out / MARKER_NAME)!r} is damaged (entry {bad!r} is not the plain name" in err
        assert "removes nothing" in err and snapshot(tmp_path) == before and not (out / LOCK_NAME).exists()
    assert (decoy / "precious.txt").read_text() == "the user's"


def test_overwrite_removes_a_symlinked_entry_as_a_link(tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_text("not the trainer's")
    folder = RunFolder.claim(out)
    folder.start(["validation", "samples.png"], fresh=True)
    (out / "validation").symlink_to(elsewhere, target_is_directory=True)  # replaced by a link after the run
    (out / "samples.png").symlink_to(elsewhere / "keep.png")
    folder.release()
    folder = RunFolder.claim(out)
    assert sorted(folder.start(["a.txt"], fresh=True)) == ["samples.png", "validation"]
    folder.release()
    assert (elsewhere / "keep.png").read_text() == "not the trainer's"
    assert not (out / "validation").is_symlink() and not (out / "samples.png").is_symlink()


# -- 2. the lock file: never through a link; its release never hides the real error ---------------------------
def test_lock_file_symlink_is_refused_and_its_target_untouched(tiny_base, tmp_path, capsys):
    out = tmp_path / "out" / "r2"
    out.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("the user's file")
    (out / LOCK_NAME).symlink_to(Path("..") / ".." / "victim.txt")
    assert run(tiny_base, out, *QUICK) == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1
    assert f"the lock file {str(out / LOCK_NAME)!r} of `--output_dir` is a symbolic link" in err
    assert victim.read_text() == "the user's file" and (out / LOCK_NAME).is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    fifo = tmp_path / "fifo.lock"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is not a regular file"):
        FolderLock(fifo).acquire()


def test_read_only_folder_mid_run_shows_the_real_error_and_frees_the_lock(tiny_base, tmp_path, monkeypatch, capsys):
    from diffusers_am.training import outputs

    out = tmp_path / "run"
    real_unlink = pathlib.Path.unlink

    def unlink(self, *args, **kwargs):
        if self.name == LOCK_NAME:  # the folder turned read-only: entries cannot be removed
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_unlink(self, *args, **kwargs)

    def read_only(ctx):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "unlink", unlink)
        patch.setattr(outputs, "save_adapter", read_only)
        assert run(tiny_base, out, "--checkpointing_steps", "1", *QUICK) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and last_line(err).startswith(
        f"error: could not write into {str(out)!r} during final outputs at update 2 (Permission denied); "
    )
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in last_line(err)
    assert (out / LOCK_NAME).read_text() == ""  # could not be removed: emptied, so it names no live holder
    assert run(tiny_base, out, "--resume_from_checkpoint", "latest", *QUICK) == 0  # the next run goes ahead
    assert "in use by another trainer" not in capsys.readouterr().err and not (out / LOCK_NAME).exists()


# -- 3. no resume path unpickles ------------------------------------------------------------------------------
class _Planted:
    """Unpickling this creates the file ``path`` (standing for any code a pickle can run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_hold_no_pickle_and_a_planted_one_is_never_run(tiny_base, tmp_path, capsys):
    from diffusers_am.training.safe_state import pickle_files

    out = tmp_path / "run"
    assert run(tiny_base, out, "--use_ema", "--checkpointing_steps", "1", *QUICK) == 0
    for _, checkpoint in list_checkpoints(out):
        assert pickle_files(checkpoint) == []
        assert {"training_state.safetensors", "training_state.json", "rng_state_0.safetensors"} <= {
            p.name for p in checkpoint.iterdir()
        }
    ran = tmp_path / "pickle-ran"
    payload = pickle.dumps(_Planted(ran))
    pickle.loads(payload)  # the payload does run code when unpickled: the check below can fail
    assert ran.is_file()
    ran.unlink()
    capsys.readouterr()
    checkpoint = out / "checkpoint-2"
    state = (checkpoint / "trainer_state.json").read_text()
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (checkpoint / "trainer_state.json").write_text(state)
        (checkpoint / name).write_bytes(payload)
        record_file(checkpoint, name)  # its checksum updated too: checksums beside it are no trust
        before = snapshot(out)
        for spec in (str(checkpoint), "latest"):
            assert run(tiny_base, out, "--use_ema", "--max_train_steps", "3", "--resume_from_checkpoint", spec,
                       *QUICK) == 2
            err = capsys.readouterr().err
            assert len(messages(err)) == 1, err
            assert f"`--resume_from_checkpoint` {str(checkpoint)!r} is refused: it holds pickled state ({name})" in err
            assert not ran.exists() and snapshot(out) == before
        (checkpoint / name).unlink()


def test_safe_state_round_trips_optimizer_scheduler_ema_and_rng(tmp_path):
    import random

    import numpy as np
    from diffusers.training_utils import EMAModel

    from diffusers_am.training.safe_state import capture_rng, load_state_dict, restore_rng, save_rng, save_state_dict

    param = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([param], lr=0.1, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    ema = EMAModel([param], decay=0.9)
    for _ in range(2):
        param.grad = torch.randn(3, 2)
        opt.step()
        sched.step()
        ema.step([param])
    save_state_dict({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "ema": ema.state_dict(),
                     "odd": {1: float("inf"), "t": (1, None)}}, tmp_path, "state")
    back = load_state_dict(tmp_path, "state")
    assert back["odd"] == {1: float("inf"), "t": [1, None]}
    opt2 = torch.optim.AdamW([torch.nn.Parameter(param.detach().clone())], lr=0.1)
    opt2.load_state_dict(back["optimizer"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state_dict()["state"][0][key], opt.state_dict()["state"][0][key])
    assert opt2.param_groups[0]["betas"][0] == 0.8 and back["lr_scheduler"]["last_epoch"] == 2
    ema2 = EMAModel([torch.nn.Parameter(torch.zeros(3, 2))], decay=0.5)
    ema2.load_state_dict(back["ema"])
    assert ema2.decay == 0.9 and ema2.optimization_step == 2 and torch.equal(ema2.shadow_params[0],
                                                                             ema.shadow_params[0])
    save_rng(capture_rng(), tmp_path, 0)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)), random.gauss(0, 1))
    random.random(), np.random.rand(), torch.rand(1)
    restore_rng(tmp_path, 0)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1)), random.gauss(0, 1)) == expected


# -- 4. resume advice never destroys work ---------------------------------------------------------------------
def test_sigint_while_final_outputs_are_written_keeps_a_checkpoint(tiny_base, tmp_path, rewards):
    out, flag = tmp_path / "run", tmp_path / "final.flag"
    common = ("--reward", f"{rewards}:reward", "--num_eval_samples", "5")
    proc = trainer_process(tiny_base, out, *common, env={"SLOW_FINAL_FLAG": str(flag)})
    wait_for_file(proc, flag)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--overwrite_output_dir" not in err
    assert last_line(err) == (
        f"stopped by SIGINT while writing the final outputs (update 2 of 2): saved {out / 'checkpoint-2'} and the "
        f"adapter so far ({out / 'pytorch_lora_weights.safetensors'}); to write the rest, run the same command "
        "with `--resume_from_checkpoint latest`."
    )
    assert [s for s, _ in list_checkpoints(out)] == [2] and not (out / "README.md").exists()
    assert run(tiny_base, out, *common, "--resume_from_checkpoint", "latest") == 0
    assert (out / "README.md").is_file() and [r["step"] for r in read_log(out)] == [1, 2]


def test_sigterm_while_a_resumed_run_sets_up_points_at_its_checkpoint(tiny_base, tmp_path, rewards):
    out, flag = tmp_path / "run", tmp_path / "setup.flag"
    common = ("--reward", f"{rewards}:reward", "--checkpointing_steps", "2", *QUICK)
    assert run(tiny_base, out, *common) == 0
    before = snapshot(out)
    proc = trainer_process(tiny_base, out, *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                           env={"SLOW_IMPORT_FLAG": str(flag)})
    wait_for_file(proc, flag)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert last_line(err) == (
        f"stopped by SIGTERM during set-up at update 2; nothing was trained: to resume from {out / 'checkpoint-2'}, "
        "run the same command again."
    )
    assert snapshot(out) == before and not (out / LOCK_NAME).exists()


def test_advice_without_a_checkpoint_keeps_a_finished_adapter(tmp_path):
    from diffusers_am.training.stopping import RunProgress

    progress = RunProgress(tmp_path, phase="final outputs", step=3)
    assert "start over with `--overwrite_output_dir`" in progress.last_checkpoint_advice()
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    advice = progress.write_failed("No space left on device")
    assert "the adapter written so far is" in advice and "keep it, and train again in another `--output_dir`" in advice


# -- 5. checkpoint identity -----------------------------------------------------------------------------------
def test_renamed_checkpoint_is_ignored_and_never_pruned(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--checkpointing_steps", "1", *QUICK)
    assert run(tiny_base, out, "--max_train_steps", "3", *args) == 0
    (out / "checkpoint-2").rename(out / "checkpoint-9")
    capsys.readouterr()
    assert run(tiny_base, out, "--max_train_steps", "5", "--checkpoints_total_limit", "2",
               "--resume_from_checkpoint", "latest", *args) == 0
    err = capsys.readouterr().err
    assert f"warning: {str(out / 'checkpoint-9')!r} holds update 2, not the update its name says" in err
    assert [s for s, _ in list_checkpoints(out)] == [4, 5] and (out / "checkpoint-9").is_dir()
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5]
    assert run(tiny_base, out, "--max_train_steps", "12", "--resume_from_checkpoint", str(out / "checkpoint-9"),
               *args) == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and "is named for update 9, but its trainer_state.json holds update 2" in err


@pytest.mark.parametrize("step", [-5, 0, "3", 2.5, True])
def test_checkpoint_step_must_be_an_update_number(tiny_base, tmp_path, capsys, step):
    out = tmp_path / "run"
    assert run(tiny_base, out, "--max_train_steps", "1", "--checkpointing_steps", "1", *QUICK) == 0
    copy = tmp_path / "shared-checkpoint"
    shutil.copytree(out / "checkpoint-1", copy)
    rewrite_state(copy, step=step)
    capsys.readouterr()
    assert run(tiny_base, tmp_path / "new", "--resume_from_checkpoint", str(copy), *QUICK) == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and f'is corrupt ("step" is {step!r}, not an update number >= 1)' in err


def test_resuming_from_an_earlier_checkpoint_supersedes_the_later_ones(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_base, out, "--max_train_steps", "4", "--checkpointing_steps", "1", *QUICK) == 0
    capsys.readouterr()
    assert run(tiny_base, out, "--max_train_steps", "3", "--checkpointing_steps", "3", "--learning_rate", "0.01",
               "--resume_from_checkpoint", str(out / "checkpoint-2"), *QUICK) == 0
    err = capsys.readouterr().err
    assert "warning: resuming from checkpoint-2 replaces the later updates of this run: superseded-" in err
    assert [s for s, _ in list_checkpoints(out)] == [1, 2, 3]
    assert run(tiny_base, out, "--max_train_steps", "5", "--checkpointing_steps", "3", "--learning_rate", "0.01",
               "--resume_from_checkpoint", "latest", *QUICK) == 0
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in read_log(out)] == pytest.approx([3e-3, 3e-3, 0.01, 0.01, 0.01])
    assert "| learning rate | 0.003 (updates 1-2), 0.01 (updates 3-5) (constant) |" in (out / "README.md").read_text()
    marker = json.loads((out / MARKER_NAME).read_text())
    superseded = sorted(p.name for p in out.glob("superseded-*"))
    assert len(superseded) == 2 and set(superseded) <= set(marker["entries"])  # kept, and known as the run's own
    run_id = marker["run_id"]
    assert len(run_id) == 32 and all(
        json.loads((p / "trainer_state.json").read_text())["run_id"] == run_id for _, p in list_checkpoints(out)
    )


def test_checkpoint_of_another_run_is_refused_in_a_folder_holding_a_run(tiny_base, tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run(tiny_base, a, "--checkpointing_steps", "2", *QUICK) == 0
    assert run(tiny_base, b, "--seed", "3", "--checkpointing_steps", "2", *QUICK) == 0
    before = snapshot(b)
    capsys.readouterr()
    assert run(tiny_base, b, "--max_train_steps", "3", "--resume_from_checkpoint", str(a / "checkpoint-2"),
               *QUICK) == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and snapshot(b) == before
    assert f"`--resume_from_checkpoint` {str(a / 'checkpoint-2')!r} belongs to another run than the one" in err
    shutil.copytree(a / "checkpoint-2", b / "checkpoint-3")  # planted among b's own, renamed to fit: its run differs
    rewrite_state(b / "checkpoint-3", step=3)
    assert run(tiny_base, b, "--max_train_steps", "4", "--resume_from_checkpoint", str(b / "checkpoint-3"),
               *QUICK) == 2
    assert "belongs to another run" in capsys.readouterr().err
    shutil.rmtree(b / "checkpoint-3")
    # into a new folder it continues run a, which keeps its id
    assert run(tiny_base, c, "--max_train_steps", "3", "--resume_from_checkpoint", str(a / "checkpoint-2"),
               *QUICK) == 0
    assert json.loads((c / MARKER_NAME).read_text())["run_id"] == json.loads((a / MARKER_NAME).read_text())["run_id"]


# -- 6. malformed checksum records ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "files",
    [
        {"trainable_params.safetensors": "garbage"},
        {"trainable_params.safetensors": {"sha256": 5, "bytes": 1}},
        {"trainable_params.safetensors": {"sha256": "00"}},
        {"../../etc/passwd": {"sha256": "00", "bytes": 1}},
        ["trainable_params.safetensors"],
        {},
    ],
)
def test_malformed_files_record_is_a_damaged_checkpoint(tiny_base, tmp_path, capsys, files):
    out = tmp_path / "run"
    args = ("--checkpointing_steps", "1", *QUICK)
    assert run(tiny_base, out, *args) == 0
    rewrite_state(out / "checkpoint-2", files=files)
    capsys.readouterr()
    assert run(tiny_base, out, "--max_train_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2"),
               *args) == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and f"`--resume_from_checkpoint` {str(out / 'checkpoint-2')!r} is damaged (" in err
    assert run(tiny_base, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", *args) == 0
    assert "resuming from checkpoint-1, the newest intact one" in capsys.readouterr().err
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


# -- 7. the log's torn last line ------------------------------------------------------------------------------
def test_torn_last_log_line_is_dropped_other_damage_is_named(tiny_base, tmp_path, capsys):
    out = tmp_path / "run"
    args = ("--checkpointing_steps", "2", *QUICK)
    assert run(tiny_base, out, *args) == 0
    log = out / "train_log.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines) + '{"reward_mean": 0.1, "step": 3, "lo')  # killed while writing update 3
    capsys.readouterr()
    assert run(tiny_base, out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", *args) == 0
    assert f"warning: dropped the torn last line of {str(log)!r}" in capsys.readouterr().err
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + "not json\n" + "".join(lines[2:]))
    before = snapshot(out)
    assert run(tiny_base, out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *args) == 2
    err = capsys.readouterr().err
    assert len(messages(err)) == 1 and f"{str(log)!r} line 2 is not a JSON record with an integer step" in err
    assert snapshot(out)["train_log.jsonl"] == before["train_log.jsonl"]  # the log is left as it was


# -- 8. a reward failing mid-run keeps the completed updates ----------------------------------------------------
def test_reward_failing_at_update_two_keeps_update_one(tiny_base, tmp_path, rewards, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ("--reward", f"{rewards}:reward", "--max_train_steps", "3", *QUICK)
    monkeypatch.setenv("FAIL_AT_UPDATE", "2")
    assert run(tiny_base, out, *common) == 1  # a bug keeps its traceback
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: the reward server went away" in err
    assert (
        f"warning: RuntimeError during training: stopped after update 1 of 3; saved {out / 'checkpoint-1'}, the last "
        "completed update: after fixing it, run the same command with `--resume_from_checkpoint latest`." in err
    )
    assert [s for s, _ in list_checkpoints(out)] == [1] and not (out / LOCK_NAME).exists()
    monkeypatch.delenv("FAIL_AT_UPDATE")
    assert run(tiny_base, out, *common, "--resume_from_checkpoint", "latest") == 0
    straight = tmp_path / "straight"
    assert run(tiny_base, straight, *common) == 0
    a, b = load_file(out / "pytorch_lora_weights.safetensors"), load_file(straight / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


def test_value_error_mid_run_says_what_is_on_disk(tiny_base, tmp_path, rewards, monkeypatch, capsys):
    """A plain ValueError from the reward mid-run is not a UserError: it keeps its traceback (exit 1), after the
    line saying what is on disk; only a UserError would be one `error:` line."""
    from diffusers_am.errors import BUG_LINE

    out = tmp_path / "run"
    monkeypatch.setenv("FAIL_AT_UPDATE", "2")
    monkeypatch.setenv("FAIL_HOW", "value")
    assert run(tiny_base, out, "--reward", f"{rewards}:reward", "--max_train_steps", "3", *QUICK) == 1
    err = capsys.readouterr().err
    assert (
        f"warning: ValueError during training: stopped after update 1 of 3; saved {out / 'checkpoint-1'}, the last "
        "completed update: after fixing it, run the same command with `--resume_from_checkpoint latest`." in err
    )
    assert "Traceback (most recent call last)" in err and "ValueError: the reward got prompts it cannot score" in err
    assert last_line(err) == BUG_LINE and "error: the reward" not in err
    assert [s for s, _ in list_checkpoints(out)] == [1]


# -- 9. a kill during mid-run validation ----------------------------------------------------------------------
def test_validation_killed_mid_run_is_redone_on_resume(tiny_base, tmp_path, rewards):
    out, flag = tmp_path / "run", tmp_path / "validation.flag"
    common = ("--max_train_steps", "3", "--checkpointing_steps", "1", "--validation_steps", "1", *QUICK)
    proc = trainer_process(tiny_base, out, *common, "--validation_reward", f"{rewards}:held_out",
                           env={"SLOW_VALIDATION_FLAG": str(flag)})
    wait_for_file(proc, flag)
    proc.kill()
    proc.communicate(timeout=60)
    assert [s for s, _ in list_checkpoints(out)] == [1] and not (out / "validation" / "step-000001.png").exists()
    assert run(tiny_base, out, *common, "--validation_reward", f"{rewards}:held_out",
               "--resume_from_checkpoint", "latest") == 0
    assert sorted(p.name for p in (out / "validation").glob("step-*.png")) == ["step-000001.png", "step-000002.png"]
    records = [json.loads(line) for line in (out / "validation_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["model"] == "fine-tuned"] == [1, 2, 3]
    assert not list((out / "validation").glob(".tmp-*"))
