"""``RunProgress``: where a run is (phase, update, last checkpoint), and the one line said when it stops
early: a signal outside the updates, a second Ctrl-C, or an output that cannot be written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoints import CheckpointManager, list_checkpoints
from .interrupts import signal_name
from .outputs import ADAPTER_NAME

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
