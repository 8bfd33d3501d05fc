"""Resumable checkpoints, written atomically and checked when read back, and what a resume may change.

A checkpoint ``output_dir/checkpoint-<step>/`` holds
  * ``trainable_params.safetensors``: the exact trainable (LoRA) tensors, by parameter name;
  * ``pytorch_lora_weights.safetensors``: the same adapter in diffusers format (``pipe.load_lora_weights``);
  * ``training_state.safetensors`` + ``.json``: the optimizer, LR schedule, EMA and gradient scaler states,
    and ``rng_state_<process>.safetensors``: each process's RNG states (:mod:`.safe_state`; no pickle, so
    resuming a shared checkpoint never runs code from it: one holding a ``.pkl`` / ``.bin`` is refused.
    Under DeepSpeed and FSDP2 the engine's own state files are accelerate's ``save_state`` format);
  * ``trainer_state.json``: the step (the one in the folder's name), the run's id and config and the SHA-256
    of every other file, written last.
It is first written to ``.tmp-checkpoint-<step>`` and renamed when complete, so a kill during the write
leaves the previous checkpoints untouched; folders without ``trainer_state.json`` are never resumed from,
and a checkpoint whose files do not match their checksums is named as damaged (``latest`` then falls back
to the newest intact one; a folder whose name does not match its step, e.g. a renamed one, is ignored with a
warning and never pruned). Resuming from an earlier checkpoint of a folder moves the later ones of the
replaced updates aside (``superseded-<run>-checkpoint-<step>``), so ``latest`` never picks them. The free
space is checked before each save; a save that fails keeps the previous checkpoints and says so in one line.

Checksums: a checkpoint records ``{relative path: {"sha256": ..., "bytes": ...}}`` of every file it holds; resuming
verifies them, so damaged bytes (a disk error, a partial copy) are found before they are trained on.

What a resume may change: a checkpoint also records the config it was trained with. On resume, an option that
defines the run (the model, method, K, N, p, reward, LoRA, batch, seed, optimizer, schedule, precision ...) must be
what it was: changing it mid-run would silently train something else, so it is refused with one line naming it. The
options in :data:`CHANGEABLE_ON_RESUME` may change; the new values are used from the resumed update on, and
``training_config.json`` and the model card record them (the learning rate with its history).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable

import torch

from ..errors import UserError
from ..filemode import match_umask
from ..jsonio import write_json
from .config import TrainingConfig
from .console import warn
from .disk import bytes_to_save, checkpoint_bytes_estimate, folder_bytes, format_bytes, free_bytes, write_failure
from .engines import any_process, assign_full, is_deepspeed, is_fsdp2
from .layout import CHECKPOINT_PREFIX, PARAMS_FILE, STATE_FILE, SUPERSEDED_PREFIX, TMP_PREFIX, TRAINING_STATE
from .safe_state import capture_rng, load_state_dict, pickle_files, restore_rng, save_rng, save_state_dict

_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def _folder_step(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def _state_step(path: Path) -> int | None:
    """The step trainer_state.json of ``path`` records (None when unreadable or not an int >= 1)."""
    try:
        return _checked_step(json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _checked_step(state: Any) -> int:
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise UserError(f'"step" is {step!r}, not an update number >= 1')
    return step


def _candidates(root: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<N>`` folders holding a trainer_state.json, as (N, path)."""
    if not root.is_dir():
        return []
    return [
        (_folder_step(c), c)
        for c in root.iterdir()
        if _folder_step(c) is not None and c.is_dir() and not c.is_symlink() and (c / STATE_FILE).is_file()
    ]


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first: ``checkpoint-<N>`` folders whose
    trainer_state.json holds step N (a renamed or edited one is left out, see :func:`misnamed_checkpoints`)."""
    return sorted((n, p) for n, p in _candidates(Path(output_dir)) if _state_step(p) in (n, None))


def misnamed_checkpoints(output_dir: str | Path) -> list[tuple[Path, int | None]]:
    """``checkpoint-<N>`` folders whose trainer_state.json does not hold step N, with the step it holds."""
    out = []
    for n, path in sorted(_candidates(Path(output_dir))):
        step = _state_step(path)
        if step is not None and step != n:
            out.append((path, step))
    return out


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint; ValueError if missing or unreadable, or when its step is not
    an update number >= 1 or not the one in the folder's name (``checkpoint-<N>`` holds update N)."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise UserError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r} is not a complete checkpoint (no {STATE_FILE}); "
            "it may have been interrupted while being written. Pass an earlier checkpoint-<step> folder or 'latest'."
        )
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        step = _checked_step(state)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r}: {str(path)!r} is corrupt ({err}); pass another "
            "checkpoint-<step> folder."
        ) from None
    named = _folder_step(Path(checkpoint))
    if named is not None and named != step:
        raise UserError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r} is named for update {named}, but its {STATE_FILE} "
            f"holds update {step} (renamed or edited); pass the checkpoint under its own name, "
            f"{CHECKPOINT_PREFIX}{step}."
        )
    return state


def _files_problem(recorded: Any) -> str | None:
    """Why the "files" record of a trainer_state.json is unusable (None when well-formed)."""
    if not isinstance(recorded, dict):
        return f'{STATE_FILE} records no checksums ("files")'
    for rel, info in recorded.items():
        parts = Path(rel).parts if isinstance(rel, str) else ()
        safe = bool(parts) and not Path(rel).is_absolute() and ".." not in parts and "\0" not in rel
        valid = (
            isinstance(info, dict)
            and isinstance(info.get("sha256"), str)
            and isinstance(info.get("bytes"), int)
            and not isinstance(info.get("bytes"), bool)
            and info["bytes"] >= 0
        )
        if not safe or not valid:
            return f'{STATE_FILE} has a malformed "files" entry {rel!r}'
    return None


def checkpoint_problem(checkpoint: str | Path, allow_pickle: bool = False) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (no or corrupt state file, a malformed or missing checksum
    record, a file that does not match its checksum, a pickle file unless ``allow_pickle``), as a short
    phrase; None when it is intact."""
    try:
        state = read_trainer_state(checkpoint)
    except UserError:
        return f"no readable {STATE_FILE}"
    recorded = state.get("files")
    problem = _files_problem(recorded)
    if problem is None and PARAMS_FILE not in recorded:
        problem = f"{STATE_FILE} records no {PARAMS_FILE}"
    return problem or (None if allow_pickle else pickle_problem(checkpoint)) or verify_checksums(checkpoint, recorded)


def pickle_problem(checkpoint: str | Path) -> str | None:
    """The phrase for a checkpoint holding pickled state (None when it holds none)."""
    found = pickle_files(checkpoint)
    if not found:
        return None
    return (
        f"it holds pickled state ({', '.join(found[:3])}), which resuming never loads because unpickling can run "
        "code: written by an older diffusers-am, or changed since"
    )


def resolve_checkpoint(spec: str, output_dir: str | Path, holds_run: bool = False, allow_pickle: bool = False) -> Path:
    """The checkpoint folder ``--resume_from_checkpoint`` names: a path, or ``latest`` in output_dir.

    ``latest`` is the newest intact checkpoint (damaged ones are skipped with a warning, renamed ones are
    ignored with a warning); a named checkpoint must be intact. A checkpoint holding pickled state is
    refused either way (unless ``allow_pickle``: DeepSpeed / FSDP2 runs, whose engines store theirs so).
    ``holds_run``: output_dir holds a run (it shapes the advice when there is no checkpoint). ValueError
    with one line otherwise."""
    if spec == "latest":
        for path, step in misnamed_checkpoints(output_dir):
            warn(
                f"{str(path)!r} holds update {step}, not the update its name says (renamed?); it is ignored "
                "(never resumed from, never pruned)."
            )
        found = list_checkpoints(output_dir)
        if not found:
            advice = (
                "the run there stopped before its first checkpoint: pass `--overwrite_output_dir` instead of "
                "`--resume_from_checkpoint` to start over"
                if holds_run
                else "drop the flag to start a new run"
            )
            raise UserError(
                f"`--resume_from_checkpoint latest`: no complete checkpoint in {str(output_dir)!r}; {advice} "
                "(save checkpoints with `--checkpointing_steps`)."
            )
        damaged: list[tuple[Path, str]] = []
        for _, path in reversed(found):
            problem = checkpoint_problem(path, allow_pickle=True)
            if problem is None and not allow_pickle and pickle_problem(path):
                _refuse_pickle(path)
            if problem is None:
                for i, (bad, why) in enumerate(damaged):
                    then = f"resuming from {path.name}, the newest intact one" if i == len(damaged) - 1 else "skipped"
                    warn(f"checkpoint {str(bad)!r} is damaged ({why}); {then}.")
                return path
            damaged.append((path, problem))
        raise UserError(
            f"`--resume_from_checkpoint latest`: every checkpoint in {str(output_dir)!r} is damaged (newest: "
            f"{damaged[0][0].name}, {damaged[0][1]}); pass another `--output_dir` to start a new run."
        )
    path = Path(spec)
    if not path.is_dir() and not path.is_absolute() and (Path(output_dir) / spec).is_dir():
        path = Path(output_dir) / spec
    if not path.is_dir():
        raise UserError(
            f"`--resume_from_checkpoint` {spec!r} does not exist; pass a checkpoint-<step> folder "
            f"(in {str(output_dir)!r}: {[p.name for _, p in list_checkpoints(output_dir)]}) or 'latest'."
        )
    read_trainer_state(path)
    if not allow_pickle and pickle_problem(path):
        _refuse_pickle(path)
    problem = checkpoint_problem(path, allow_pickle=allow_pickle)
    if problem is not None:
        raise UserError(
            f"`--resume_from_checkpoint` {str(path)!r} is damaged ({problem}); pass an earlier checkpoint-<step> "
            "folder, or 'latest' (the newest intact one)."
        )
    return path


def _refuse_pickle(path: Path) -> None:
    raise UserError(
        f"`--resume_from_checkpoint` {str(path)!r} is refused: {pickle_problem(path)}. Resume from a checkpoint "
        "this version wrote, or start a new run in another `--output_dir`."
    )


def supersede_later(output_dir: str | Path, step: int, run_id: str | None, record: Callable[..., None]) -> list[Path]:
    """Move the checkpoints of ``output_dir`` later than ``step`` aside (a run resumed from an earlier
    checkpoint replaces those updates): ``checkpoint-<N>`` becomes ``superseded-<run>-checkpoint-<N>``, kept
    but never resumed from nor pruned. ``record`` adds each new name to the run's marker first. Returns the
    new paths."""
    moved = []
    tag = (run_id or "run")[:8]
    for n, path in list_checkpoints(output_dir):
        if n <= step:
            continue
        target = path.with_name(f"{SUPERSEDED_PREFIX}{tag}-{path.name}")
        i = 1
        while target.exists() or target.is_symlink():
            target = path.with_name(f"{SUPERSEDED_PREFIX}{tag}-{i}-{path.name}")
            i += 1
        record(target.name)
        path.rename(target)
        moved.append(target)
    return moved


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
        states: objects with ``state_dict`` / ``load_state_dict`` by name (the optimizer, LR scheduler, EMA;
            None entries are skipped), stored in ``training_state.*`` with the gradient scaler (no pickle).
            Under DeepSpeed / FSDP2 accelerate's ``save_state`` / ``load_state`` store them instead (the EMA
            registered with ``register_for_checkpointing``).
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
        states: dict[str, Any] | None = None,
    ):
        self.accelerator = accelerator
        self.engine_format = is_deepspeed(accelerator) or is_fsdp2(accelerator)
        """Whether accelerate's save_state / load_state store the state (DeepSpeed / FSDP2 engines)."""
        self.states = {k: v for k, v in (states or {}).items() if v is not None}
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
        if self.engine_format:
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
            raise UserError(
                f"trainable parameters differ from this run's LoRA (missing {missing}, unexpected {extra}); "
                "resume with the same --rank, --lora_target_modules and model."
            )
        with torch.no_grad():
            for name, param in self.named_params.items():
                if tensors[name].shape != param.shape:
                    raise UserError(
                        f"parameter {name!r} has shape {tuple(tensors[name].shape)} in the checkpoint, "
                        f"{tuple(param.shape)} in this run; resume with the same LoRA settings."
                    )
                if not torch.isfinite(tensors[name]).all():
                    raise UserError(
                        f"`--resume_from_checkpoint` {input_dir!r} is damaged: {PARAMS_FILE} holds non-finite "
                        f"values in {name!r}; pass an earlier checkpoint."
                    )
                assign_full(param, tensors[name])  # a sharded (FSDP2) parameter takes its shard
        models.clear()

    # the state without pickle (every run but DeepSpeed / FSDP2)
    def _write_state(self, folder: Path, rng: dict[str, torch.Tensor] | None) -> None:
        """Write the LoRA, adapter, training state and this process's RNG states (``rng``: captured earlier,
        else now) into ``folder`` (every process)."""
        acc = self.accelerator
        if self.engine_format:
            acc.save_state(str(folder))
            return
        self._save_hook([], [], str(folder))
        if acc.is_main_process:
            state = {name: obj.state_dict() for name, obj in self.states.items()}
            if acc.scaler is not None:
                state["grad_scaler"] = acc.scaler.state_dict()
            save_state_dict(state, folder, TRAINING_STATE)
        save_rng(rng if rng is not None else capture_rng(), folder, acc.process_index)

    def _read_state(self, folder: Path) -> None:
        """Restore what :meth:`_write_state` wrote (the checkpoint was checked for pickles before)."""
        acc = self.accelerator
        problem = pickle_problem(folder)
        if problem is not None:  # checked at set-up already; never read one
            raise UserError(f"`--resume_from_checkpoint` {str(folder)!r} is refused: {problem}.")
        self._load_hook([], str(folder))
        try:
            state = load_state_dict(folder, TRAINING_STATE)
            expected = set(self.states) | ({"grad_scaler"} if acc.scaler is not None else set())
            if set(state) != expected:
                raise UserError(f"{TRAINING_STATE}.json holds {sorted(state)}, this run needs {sorted(expected)}")
            for name, obj in self.states.items():
                if name == "ema":  # EMAModel keeps the loaded shadow weights as they are: put them on its device
                    loaded = zip(state[name]["shadow_params"], obj.shadow_params)
                    state[name]["shadow_params"] = [t.to(device=c.device, dtype=c.dtype) for t, c in loaded]
                obj.load_state_dict(state[name])
            if acc.scaler is not None:
                acc.scaler.load_state_dict(state["grad_scaler"])
            restore_rng(folder, acc.process_index)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError, OSError) as err:
            raise UserError(
                f"`--resume_from_checkpoint` {str(folder)!r} is damaged or was written by a different setup "
                f"({type(err).__name__}: {err}); resume with the same options (--use_ema, --mixed_precision, ...), "
                "or pass another checkpoint."
            ) from None

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

    def save(
        self, step: int, extra: dict[str, Any] | None = None, rng: dict[str, torch.Tensor] | None = None
    ) -> Path | None:
        """Write ``checkpoint-<step>`` atomically, with the checksum of every file (all processes call this);
        ``rng``: this process's RNG states as they were after update ``step`` (default: as they are now).

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
            self._write_state(tmp, rng)
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
            if self.engine_format:
                self.accelerator.load_state(str(checkpoint))
            else:
                self._read_state(Path(checkpoint))
        except UserError:
            raise
        except Exception as err:
            raise UserError(
                f"`--resume_from_checkpoint` {str(checkpoint)!r} is corrupt or was written by a different setup "
                f"({type(err).__name__}: {err}); pass another checkpoint or start a new run."
            ) from err
        return state


# -- checksums of the files a checkpoint holds ---------------------------------------------------------------

_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder: str | Path, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """{path relative to ``folder`` (posix): {"sha256", "bytes"}} of every file under it, but ``exclude``."""
    root = Path(folder)
    skip = set(exclude)
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in skip:
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def verify_checksums(folder: str | Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """The first problem of ``folder`` against ``recorded`` checksums (a missing file, another size or
    other bytes), as a short phrase; None when every recorded file is intact."""
    root = Path(folder)
    for rel, info in sorted(recorded.items()):
        path = root / rel
        if not path.is_file():
            return f"{rel} is missing"
        size = path.stat().st_size
        if size != info.get("bytes", size):
            return f"{rel} has {size} bytes, {info['bytes']} were written"
        if sha256_file(path) != info.get("sha256"):
            return f"{rel} does not match its recorded sha256"
    return None


# -- what a resume may change --------------------------------------------------------------------------------

CHANGEABLE_ON_RESUME = frozenset(
    {
        "learning_rate",
        "max_train_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "validation_prompts",
        "num_validation_images",
        "validation_reward",
        "validation_features",
        "validation_diversity",
        "num_eval_samples",
        "gradient_checkpointing",
        "cpu_threads",
        "report_to",
        "logging_dir",
        "tracker_project_name",
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "push_to_hub",
        "hub_model_id",
        "hub_token",
    }
)
"""Options a resumed run may change (everything else must match the checkpoint's config)."""


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=str))


def check_resume_config(saved: dict[str, Any] | None, config: TrainingConfig, checkpoint: str, step: int) -> dict:
    """Compare ``config`` with the ``saved`` config of ``checkpoint`` (at update ``step``).

    Returns {option: (old, new)} of the changed options that may change; raises ValueError naming the
    first option that may not. A checkpoint without a recorded config (older format) is not checked."""
    if config.max_train_steps < step:
        raise UserError(
            f"`--max_train_steps` {config.max_train_steps} is below update {step} of {checkpoint}; "
            f"pass `--max_train_steps` >= {step}."
        )
    if not saved:
        return {}
    now = _plain(config.to_dict())
    saved = _plain(saved)
    changed = {}
    for name, value in now.items():
        if name not in saved or saved[name] == value:
            continue
        if name not in CHANGEABLE_ON_RESUME:
            raise UserError(
                f"`--{name}` was {saved[name]!r} in {checkpoint} and is {value!r} now; it cannot change when "
                f"resuming: pass `--{name} {_flag_value(saved[name])}`, or start a new run in another `--output_dir`."
            )
        changed[name] = (saved[name], value)
    return changed


def _flag_value(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "none" if value is None else str(value)


def apply_learning_rate(optimizer: torch.optim.Optimizer, lr_scheduler: Any, learning_rate: float) -> None:
    """Make ``learning_rate`` the base LR of a restored optimizer and (diffusers / torch ``LambdaLR``) schedule,
    keeping the schedule's position: the LR of the next update is ``learning_rate * lambda(step)``."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    scheduler.base_lrs = [float(learning_rate)] * len(optimizer.param_groups)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    for group, base, factor in zip(
        optimizer.param_groups, scheduler.base_lrs, lambdas or [lambda _: 1.0] * len(optimizer.param_groups)
    ):
        group["initial_lr"] = base
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def learning_rate_text(history: list[tuple[int, float]], steps: int) -> str:
    """The learning rate of a run for its model card: ``3e-3``, or ``3e-3 (updates 1-4), 1e-3 (updates 5-10)``
    when a resume changed it; ``history`` holds (first update, learning rate) pairs in order."""
    if len(history) <= 1:
        return f"{history[0][1]:.4g}" if history else "n/a"
    parts = []
    for i, (start, lr) in enumerate(history):
        end = history[i + 1][0] - 1 if i + 1 < len(history) else steps
        parts.append(f"{lr:.4g} (updates {start}-{end})")
    return ", ".join(parts)
