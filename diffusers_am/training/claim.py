"""What a run starts from, decided on the main process before anything is loaded: the output folder
(claimed and locked, :mod:`.run_folder`), the checkpoint to resume from (checked against the config,
:mod:`.resume_policy`) and the Hub repo (created or checked, :mod:`.hub`). The other processes learn the
outcome; a refusal is one line on every process, and nothing is written but the lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoints import list_checkpoints, read_trainer_state, resolve_checkpoint
from .config import TrainingConfig
from .errors import MainProcessError
from .logs import LOG_NAME
from .outputs import ADAPTER_NAME, CONFIG_NAME, OUTPUT_NAMES, SUMMARY_NAME
from .resume_policy import check_resume_config
from .run_folder import RunFolder
from .validation import VALIDATION_LOG_NAME


@dataclass
class RunClaim:
    """The claimed output folder (main process only, else None), the checkpoint to resume from (None: a new
    run) and the Hub repo id as ``create_repo`` resolved it (None without ``--push_to_hub``)."""

    folder: RunFolder | None
    resume_path: Path | None
    hub_repo: str | None


def previous_run_files(output_dir: Path) -> list[str]:
    """Names in ``output_dir`` that belong to an earlier run (log, adapter, checkpoints)."""
    if not output_dir.is_dir():
        return []
    names = [LOG_NAME, ADAPTER_NAME, SUMMARY_NAME]
    found = [n for n in names if (output_dir / n).exists()]
    return found + [p.name for _, p in list_checkpoints(output_dir)]


def run_entries(config: TrainingConfig) -> list[str]:
    """Top-level entries of output_dir a run writes (listed in the run's marker before they are written)."""
    names = [CONFIG_NAME, LOG_NAME, f"{LOG_NAME}.tmp", VALIDATION_LOG_NAME, f"{VALIDATION_LOG_NAME}.tmp",
             "validation", *OUTPUT_NAMES]
    logging_dir = Path(config.logging_dir)
    if not logging_dir.is_absolute() and logging_dir.parts and logging_dir.parts[0] != "..":
        names.append(logging_dir.parts[0])
    return names


def check_previous_run(
    config: TrainingConfig, output_dir: Path, run_id: str | None = None, allow_pickle: bool = False
) -> Path | None:
    """The checkpoint to resume from (checked against ``config``), or None for a new run; ValueError when
    output_dir holds a run and neither ``--resume_from_checkpoint`` nor ``--overwrite_output_dir`` is given,
    or when the checkpoint belongs to another run than the one output_dir holds (``run_id``, from its
    marker). ``allow_pickle``: the engine (DeepSpeed / FSDP2) stores its state with pickle."""
    previous = previous_run_files(output_dir)
    if config.resume_from_checkpoint:
        path = resolve_checkpoint(
            config.resume_from_checkpoint, output_dir, holds_run=bool(previous), allow_pickle=allow_pickle
        )
        state = read_trainer_state(path)
        check_resume_config(state.get("config"), config, str(path), int(state["step"]))
        inside = path.resolve().parent == output_dir.resolve()
        theirs = state.get("run_id")
        if previous and (run_id != theirs if run_id and theirs else not inside):
            raise ValueError(
                f"`--resume_from_checkpoint` {str(path)!r} belongs to another run than the one `--output_dir` "
                f"{str(output_dir)!r} holds ({', '.join(previous[:3])}); resume it into its own folder "
                f"({str(path.parent)!r}) or a new or empty `--output_dir`."
            )
        return path
    if previous and not config.overwrite_output_dir:
        found = list_checkpoints(output_dir)
        resume = (
            f"pass `--resume_from_checkpoint latest` to continue it (from {found[-1][1].name}), "
            if found
            else "it has no checkpoint to resume from; "
        )
        raise ValueError(
            f"`--output_dir` {str(output_dir)!r} already holds a run ({', '.join(previous[:4])}); {resume}"
            "pass `--overwrite_output_dir` to start over (it removes only this trainer's files), or another "
            "`--output_dir`."
        )
    return None


def claim_run(config: TrainingConfig, accelerator, repo_id: str) -> RunClaim:
    """Claim and lock output_dir, resolve the resume checkpoint and create / check the Hub repo ``repo_id``
    (main process), then share the outcome; ValueError (MainProcessError on the other processes) if refused."""
    output_dir = Path(config.output_dir)
    folder, error, resume, hub_repo = None, None, None, None
    if accelerator.is_main_process:
        try:
            folder = RunFolder.claim(output_dir)
            from .engines import is_deepspeed, is_fsdp2

            engine = is_deepspeed(accelerator) or is_fsdp2(accelerator)
            resume = check_previous_run(config, output_dir, folder.run_id, allow_pickle=engine)
            if config.push_to_hub:
                from .hub import prepare_repo

                hub_repo = prepare_repo(repo_id, token=config.hub_token)
        except ValueError as err:
            error = err
        except BaseException:  # a signal during the checks: leave no lock behind
            if folder is not None:
                folder.release()
            raise
        if error is not None and folder is not None:
            folder.release()
            folder = None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = broadcast_object_list([str(error) if error else None, str(resume) if resume else None, hub_repo])
        if shared[0] and error is None:
            raise MainProcessError(shared[0])
        resume, hub_repo = (Path(shared[1]) if shared[1] else None), shared[2]
    if error is not None:
        raise error
    return RunClaim(folder, resume, hub_repo)
