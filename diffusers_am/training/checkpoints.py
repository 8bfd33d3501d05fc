"""Resumable checkpoints: accelerate ``save_state`` with hooks that save the LoRA adapter, written atomically.

A checkpoint ``output_dir/checkpoint-<step>/`` holds
  * ``trainable_params.safetensors``: the exact trainable (LoRA) tensors, by parameter name;
  * ``pytorch_lora_weights.safetensors``: the same adapter in diffusers format (``pipe.load_lora_weights``);
  * accelerate's optimizer, LR scheduler, RNG (one file per process) and custom states (e.g. the EMA);
  * ``trainer_state.json``: the step, the run's config and the SHA-256 of every other file, written last.
It is first written to ``.tmp-checkpoint-<step>`` and renamed when complete, so a kill during the write
leaves the previous checkpoints untouched; folders without ``trainer_state.json`` are never resumed from,
and a checkpoint whose files do not match their checksums is named as damaged (``latest`` then falls back
to the newest intact one). The free space is checked before each save; a save that fails keeps the
previous checkpoints and says so in one line.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from ..filemode import match_umask
from ..jsonio import write_json
from .checksums import folder_checksums, verify_checksums
from .collectives import any_process
from .disk import bytes_to_save, checkpoint_bytes_estimate, folder_bytes, format_bytes, free_bytes, write_failure
from .engines import assign_full
from .notices import warn

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
PARAMS_FILE = "trainable_params.safetensors"
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint; ValueError if missing or unreadable."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise ValueError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r} is not a complete checkpoint (no {STATE_FILE}); "
            "it may have been interrupted while being written. Pass an earlier checkpoint-<step> folder or 'latest'."
        )
    try:
        state = json.loads(path.read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"`--resume_from_checkpoint` {str(checkpoint)!r}: {STATE_FILE} is corrupt ({err}).") from None
    return state


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (no or corrupt state file, a file that does not match
    its recorded checksum), as a short phrase; None when it is intact."""
    try:
        state = read_trainer_state(checkpoint)
    except ValueError:
        return f"no readable {STATE_FILE}"
    recorded = state.get("files")
    if not isinstance(recorded, dict):  # written before checksums were recorded: nothing to verify
        return None
    return verify_checksums(checkpoint, recorded)


def resolve_checkpoint(spec: str, output_dir: str | Path, holds_run: bool = False) -> Path:
    """The checkpoint folder ``--resume_from_checkpoint`` names: a path, or ``latest`` in output_dir.

    ``latest`` is the newest intact checkpoint (damaged ones are skipped with a warning); a named
    checkpoint must be intact. ``holds_run``: output_dir holds a run (it shapes the advice when there is
    no checkpoint). ValueError with one line otherwise."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            advice = (
                "the run there stopped before its first checkpoint: pass `--overwrite_output_dir` instead of "
                "`--resume_from_checkpoint` to start over"
                if holds_run
                else "drop the flag to start a new run"
            )
            raise ValueError(
                f"`--resume_from_checkpoint latest`: no complete checkpoint in {str(output_dir)!r}; {advice} "
                "(save checkpoints with `--checkpointing_steps`)."
            )
        damaged: list[tuple[Path, str]] = []
        for _, path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                for i, (bad, why) in enumerate(damaged):
                    then = f"resuming from {path.name}, the newest intact one" if i == len(damaged) - 1 else "skipped"
                    warn(f"checkpoint {str(bad)!r} is damaged ({why}); {then}.")
                return path
            damaged.append((path, problem))
        raise ValueError(
            f"`--resume_from_checkpoint latest`: every checkpoint in {str(output_dir)!r} is damaged (newest: "
            f"{damaged[0][0].name}, {damaged[0][1]}); pass `--overwrite_output_dir` to start over."
        )
    path = Path(spec)
    if not path.is_dir() and not path.is_absolute() and (Path(output_dir) / spec).is_dir():
        path = Path(output_dir) / spec
    if not path.is_dir():
        raise ValueError(
            f"`--resume_from_checkpoint` {spec!r} does not exist; pass a checkpoint-<step> folder "
            f"(in {str(output_dir)!r}: {[p.name for _, p in list_checkpoints(output_dir)]}) or 'latest'."
        )
    read_trainer_state(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(
            f"`--resume_from_checkpoint` {str(path)!r} is damaged ({problem}); pass an earlier checkpoint-<step> "
            "folder, or 'latest' (the newest intact one)."
        )
    return path


class CheckpointManager:
    """Saves and restores the full training state through an ``accelerate.Accelerator``.

    Args:
        accelerator: the run's accelerator (the trained model, optimizer and scheduler prepared on it).
        output_dir: where ``checkpoint-<step>`` folders go.
        named_params: the trainable parameters by name (on the unwrapped model).
        save_adapter: writes the diffusers-format adapter into a folder.
        total_limit: keep at most this many checkpoints (None: all).
        record: called with a top-level name in ``output_dir`` before it is written (the run's marker).
        ema: whether an EMA copy of the weights is saved too (for the size estimate).
        gathered: a context manager factory yielding the trainable parameters by name as full tensors,
            entered by every process while saving (FSDP2 all-gathers the shards there; default:
            ``named_params`` as they are). ``save_adapter`` runs inside it, on the main process.
    """

    def __init__(
        self,
        accelerator,
        output_dir: str | Path,
        named_params: dict[str, torch.nn.Parameter],
        save_adapter: Callable[[str], None],
        total_limit: int | None = None,
        record: Callable[..., None] | None = None,
        ema: bool = False,
        gathered: Callable[[], ContextManager[dict[str, torch.Tensor]]] | None = None,
    ):
        self.accelerator = accelerator
        self.gathered = gathered or (lambda: contextlib.nullcontext(self.named_params))
        self.output_dir = Path(output_dir)
        self.named_params = dict(named_params)
        self.save_adapter = save_adapter
        self.total_limit = total_limit
        self.record = record or (lambda *names: None)
        found = list_checkpoints(self.output_dir) if accelerator.is_main_process else []
        self.estimate = folder_bytes(found[-1][1]) if found else checkpoint_bytes_estimate(
            self.named_params.values(), ema
        )
        """Bytes the next checkpoint needs (the last one's size, or an estimate from the tensors)."""
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    # accelerate hooks: the adapter replaces the (mostly frozen) full model in the checkpoint
    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        with self.gathered() as named:  # every process: FSDP2 all-gathers the LoRA here
            if self.accelerator.is_main_process:
                from safetensors.torch import save_file

                save_file(
                    {n: p.detach().cpu().contiguous() for n, p in named.items()}, str(Path(output_dir) / PARAMS_FILE)
                )
                self.save_adapter(output_dir)
        weights.clear()

    def _load_hook(self, models: list, input_dir: str) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(Path(input_dir) / PARAMS_FILE))
        if set(tensors) != set(self.named_params):
            missing = sorted(set(self.named_params) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(self.named_params))[:3]
            raise ValueError(
                f"trainable parameters differ from this run's LoRA (missing {missing}, unexpected {extra}); "
                "resume with the same --rank, --lora_target_modules and model."
            )
        with torch.no_grad():
            for name, param in self.named_params.items():
                if tensors[name].shape != param.shape:
                    raise ValueError(
                        f"parameter {name!r} has shape {tuple(tensors[name].shape)} in the checkpoint, "
                        f"{tuple(param.shape)} in this run; resume with the same LoRA settings."
                    )
                if not torch.isfinite(tensors[name]).all():
                    raise ValueError(
                        f"`--resume_from_checkpoint` {input_dir!r} is damaged: {PARAMS_FILE} holds non-finite "
                        f"values in {name!r}; pass an earlier checkpoint."
                    )
                assign_full(param, tensors[name])  # a sharded (FSDP2) parameter takes its shard
        models.clear()

    # -- saving ------------------------------------------------------------------------------------
    def last_good(self) -> Path | None:
        """The newest complete checkpoint in output_dir (None when there is none)."""
        found = list_checkpoints(self.output_dir)
        return found[-1][1] if found else None

    def _not_saved(self, step: int, problem: str) -> None:
        if self.accelerator.is_main_process:
            last = self.last_good()
            keep = f"the last good checkpoint is still {str(last)!r}" if last else "there is no earlier checkpoint"
            warn(f"checkpoint-{step} was not saved ({problem}); {keep}; training goes on.")

    def _space_problem(self) -> str | None:
        needed, free = bytes_to_save(self.estimate), free_bytes(self.output_dir)
        if free < needed:
            return f"{format_bytes(free)} free on the disk of {str(self.output_dir)!r}, {format_bytes(needed)} needed"
        return None

    def save(self, step: int, extra: dict[str, Any] | None = None) -> Path | None:
        """Write ``checkpoint-<step>`` atomically, with the checksum of every file (all processes call this).

        The free space is checked first; a save that cannot be made (too little space, or an OSError
        such as ENOSPC while writing) is abandoned on every process with a one-line warning, the previous
        checkpoints untouched. Returns the checkpoint's path (on the main process), or None when not saved."""
        acc = self.accelerator
        tmp = self.output_dir / f"{TMP_PREFIX}{step}"
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        problem = None
        if acc.is_main_process:
            problem = self._space_problem()
            if problem is None:
                try:
                    self.record(tmp.name, final.name, f"{tmp.name}-old")
                    for stale in self.output_dir.glob(f"{TMP_PREFIX}*"):
                        shutil.rmtree(stale, ignore_errors=True)
                    tmp.mkdir(parents=True)
                except OSError as err:
                    problem = err.strerror or str(err)
        if any_process(acc, problem is not None):
            self._not_saved(step, problem or "another process could not write")
            return None
        try:
            acc.save_state(str(tmp))
        except Exception as err:  # a full disk: OSError, safetensors' or torch.save's own errors
            problem = write_failure(err, self.output_dir, any_os_error=True)
            if problem is None:
                raise
        if any_process(acc, problem is not None):
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            self._not_saved(step, problem or "another process could not write its part")
            return None
        if acc.is_main_process:
            try:
                self._seal(tmp, final, step, extra)
            except OSError as err:
                shutil.rmtree(tmp, ignore_errors=True)
                self._not_saved(step, write_failure(err, self.output_dir, any_os_error=True))
                final = None
        acc.wait_for_everyone()
        return final

    def _seal(self, tmp: Path, final: Path, step: int, extra: dict[str, Any] | None) -> None:
        """Record the checksums in trainer_state.json (written last), rename into place, prune (main process)."""
        match_umask(tmp)  # safetensors writes 0600
        files = folder_checksums(tmp, exclude=[STATE_FILE])
        write_json(tmp / STATE_FILE, {"step": int(step), **(extra or {}), "files": files})
        if final.exists():  # re-saving a step after a resume: swap, never leave no checkpoint
            old = self.output_dir / f"{tmp.name}-old"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        self.estimate = sum(info["bytes"] for info in files.values())
        self._prune()

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        found = list_checkpoints(self.output_dir)
        for _, path in found[: max(0, len(found) - self.total_limit)]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, checkpoint: str | Path) -> dict[str, Any]:
        """Restore model (LoRA), optimizer, LR scheduler, RNG and custom states; returns trainer_state.json."""
        state = read_trainer_state(checkpoint)
        try:
            self.accelerator.load_state(str(checkpoint))
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(
                f"`--resume_from_checkpoint` {str(checkpoint)!r} is corrupt or was written by a different setup "
                f"({type(err).__name__}: {err}); pass another checkpoint or start a new run."
            ) from err
        return state
