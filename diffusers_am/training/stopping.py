"""How a run stops before its end: exit codes, SIGINT / SIGTERM, and the one line said when it stops.

A run that ends early for a reason the user can act on raises :class:`~diffusers_am.errors.RunStopped`
(the exit codes: :mod:`diffusers_am.errors`); a run whose every update was skipped ends with
:func:`nothing_trained` and :data:`NOTHING_TRAINED_EXIT`.

SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop): while updates run, :class:`StopSignals` only records the signal:
the trainer finishes the current update, agrees with the other processes to stop after that same update
(:func:`agree_to_stop`), writes a checkpoint and the adapter so far, and exits with ``128 + signal number`` (130
for SIGINT, 143 for SIGTERM) after one line saying how to resume. A second Ctrl-C aborts at once (the last complete
checkpoint stays); a SIGINT within :data:`DUPLICATE_WINDOW_S` of the first is the same Ctrl-C delivered twice (a
terminal signals the launcher's whole process group, and ``accelerate launch`` / torchrun forwards it to the
workers again) and is ignored. Outside the updates (set-up, final outputs) there is nothing to finish, and a signal
raises :class:`Interrupted` right away.

Under ``accelerate launch`` the launcher kills its workers ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds
(default 30) after forwarding the signal: raise it when one update and a checkpoint take longer.

:class:`RunProgress` knows where a run is (phase, update, last checkpoint) and says the one line of an early
stop: a signal outside the updates, a second Ctrl-C, or an output that cannot be written.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .checkpoints import CheckpointManager, list_checkpoints
from .console import prints_here, warn
from .engines import max_over_processes
from .layout import ADAPTER_NAME

# -- exit codes, and the errors that end a run ---------------------------------------------------------------

NOTHING_TRAINED_EXIT = 3
"""Exit code of a run whose every update was skipped (see :func:`nothing_trained`)."""


def nothing_trained(steps: int, reg_order: float) -> str:
    """The one line of a run whose ``steps`` updates were all skipped as non-finite."""
    hint = ""
    if reg_order < 1.5:
        hint = (
            f" (--reg_order {reg_order:g} is close to 1: its control |a|^(1/(p-1)) overflows float32; "
            "try 1.5 or more)"
        )
    return (
        f"all {steps} updates were skipped: the reward, the loss or the gradient was NaN or inf every time, so "
        "nothing was trained and no adapter was written (train_log.jsonl has each update's values). Check the "
        f"reward's output, --reward_scale and --learning_rate{hint}."
    )


# -- SIGINT / SIGTERM ----------------------------------------------------------------------------------------

SIGNALS = (signal.SIGINT, signal.SIGTERM)


DUPLICATE_WINDOW_S = 1.0
"""A SIGINT this soon after the first is the same Ctrl-C (forwarded by a launcher), not a second one."""


class Interrupted(BaseException):
    """A stop signal arrived where the trainer does not wait for an update to finish.

    A BaseException, as KeyboardInterrupt: the ``except Exception`` of a user's reward wrapper, a save's
    full-disk handler or a library's retry loop must not turn a stop into an error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Context manager installing SIGINT / SIGTERM handlers (main thread only; restored on exit).

    ``requested`` is the first signal number received while :meth:`deferred` is active (0: none)."""

    def __init__(self) -> None:
        self.requested = 0
        self._requested_at = 0.0
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if not self._deferring:
            raise Interrupted(signum)
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self._requested_at > DUPLICATE_WINDOW_S:
                raise KeyboardInterrupt  # a second Ctrl-C: abort now
            return
        self.requested, self._requested_at = signum, time.monotonic()
        if prints_here():
            warn(
                f"{signal.Signals(signum).name} received: stopping after the current update, then writing a "
                "checkpoint and the adapter (Ctrl-C again aborts at once)."
            )

    @contextlib.contextmanager
    def stopping(self, signum: int) -> Iterator[None]:
        """While writing what a stop by ``signum`` (raised as :class:`Interrupted`) keeps: further signals are
        deferred, and a second Ctrl-C aborts as it does after a stop requested between updates."""
        self.requested, self._requested_at = signum, time.monotonic()
        with self.deferred():
            yield

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block a signal only sets ``requested``; the loop decides when to stop."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


def agree_to_stop(accelerator, requested: int) -> int:
    """The signal number every process stops for (0: go on): the largest one any process received, so all
    ranks stop after the same update (one small gather per call on several processes)."""
    return max_over_processes(accelerator, requested)


def signal_name(signum: int) -> str:
    """``SIGINT`` / ``SIGTERM`` for a signal number."""
    return signal.Signals(signum).name


# -- where the run is, and what a stop says ------------------------------------------------------------------

RESUME_HINT = "run the same command with `--resume_from_checkpoint latest`"


@dataclass
class RunProgress:
    """``phase``: set-up, the base model's evaluation, training or final outputs; ``step``: updates done (a
    resumed run: from its checkpoint on); ``saved_at``: the update whose checkpoint this run saved (or resumed
    from in output_dir) last; ``checkpoints``: the run's manager; ``resume_path``: the checkpoint it resumes."""

    output_dir: Path
    resumed: bool = False
    phase: str = "set-up"
    step: int = 0
    saved_at: int = -1
    checkpoints: CheckpointManager | None = None
    resume_path: Path | None = None

    def last_checkpoint_advice(self) -> str:
        """Where the run can continue from: the checkpoint it resumes (stopped in set-up), the last complete
        checkpoint, or, without one, what is on disk. Never advice that removes a checkpoint or an adapter."""
        if self.resume_path is not None and self.phase == "set-up":
            return f"nothing was trained: to resume from {self.resume_path}, run the same command again."
        if self.checkpoints is not None:
            last = self.checkpoints.last_good()
        else:
            found = list_checkpoints(self.output_dir)
            last = found[-1][1] if found else None
        if last is not None:
            return f"the last complete checkpoint is {last}: to continue from it, {RESUME_HINT}."
        if self.resume_path is not None:  # resumed from a checkpoint elsewhere, none written here yet
            return (
                f"the last complete checkpoint is {self.resume_path}, the one this run resumed: to continue from it, "
                "run the same command again."
            )
        adapter = self.output_dir / ADAPTER_NAME
        if adapter.is_file():
            return (
                f"there is no checkpoint to resume from; the adapter written so far is {adapter}: keep it, and train "
                "again in another `--output_dir` (`--overwrite_output_dir` would remove it)."
            )
        return "there is no checkpoint to resume from: start over with `--overwrite_output_dir`."

    def interrupted(self, signum: int, aborted: bool = False) -> str:
        """The line for a stop outside the updates (set-up, final outputs) or an abort (a second Ctrl-C)."""
        name = "Ctrl-C (abort)" if aborted else signal_name(signum)
        if self.step == 0 and not self.resumed:
            return f"stopped by {name} during {self.phase}, before the first update: nothing was trained."
        return f"stopped by {name} during {self.phase} at update {self.step}; " + self.last_checkpoint_advice()

    def stopped(self, signum: int, max_steps: int, checkpoint: Path | None, adapter_note: str) -> str:
        """The line after a stop signal between updates (or while the final outputs are written): what was
        saved and how to continue."""
        name, of = signal_name(signum), f"update {self.step} of {max_steps}"
        where = f"stopped by {name} after {of}"
        if self.phase == "final outputs":
            where = f"stopped by {name} while writing the final outputs ({of})"
            if checkpoint is not None:
                return f"{where}: saved {checkpoint}{adapter_note}; to write the rest, {RESUME_HINT}."
        if checkpoint is not None:
            return f"{where}: saved {checkpoint}{adapter_note}; to continue, {RESUME_HINT}."
        return f"{where}, but its checkpoint could not be saved{adapter_note}; " + self.last_checkpoint_advice()

    def write_failed(self, reason: str) -> str:
        """The line for an output that could not be written (a full disk) after set-up."""
        return (
            f"could not write into {str(self.output_dir)!r} during {self.phase} at update {self.step} ({reason}); "
            "free some space, then: " + self.last_checkpoint_advice()
            + f" Each checkpoint also holds its adapter ({ADAPTER_NAME})."
        )
