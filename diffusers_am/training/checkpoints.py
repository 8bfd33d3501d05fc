"""Resumable checkpoints: accelerate ``save_state`` with hooks that save the LoRA adapter, written atomically.

A checkpoint ``output_dir/checkpoint-<step>/`` holds
  * ``trainable_params.safetensors``: the exact trainable (LoRA) tensors, by parameter name;
  * ``pytorch_lora_weights.safetensors``: the same adapter in diffusers format (``pipe.load_lora_weights``);
  * accelerate's optimizer, LR scheduler, RNG (one file per process) and custom states (e.g. the EMA);
  * ``trainer_state.json``: the step, written last.
It is first written to ``.tmp-checkpoint-<step>`` and renamed when complete, so a kill during the write
leaves the previous checkpoints untouched; folders without ``trainer_state.json`` are never resumed from.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from ..jsonio import write_json

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


def resolve_checkpoint(spec: str, output_dir: str | Path) -> Path:
    """The checkpoint folder ``--resume_from_checkpoint`` names: a path, or ``latest`` in output_dir."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ValueError(
                f"`--resume_from_checkpoint latest`: no complete checkpoint in {str(output_dir)!r}; "
                "drop the flag to start a new run (save checkpoints with `--checkpointing_steps`)."
            )
        return found[-1][1]
    path = Path(spec)
    if not path.is_dir() and not path.is_absolute() and (Path(output_dir) / spec).is_dir():
        path = Path(output_dir) / spec
    if not path.is_dir():
        raise ValueError(
            f"`--resume_from_checkpoint` {spec!r} does not exist; pass a checkpoint-<step> folder "
            f"(in {str(output_dir)!r}: {[p.name for _, p in list_checkpoints(output_dir)]}) or 'latest'."
        )
    read_trainer_state(path)
    return path


class CheckpointManager:
    """Saves and restores the full training state through an ``accelerate.Accelerator``.

    Args:
        accelerator: the run's accelerator (the trained model, optimizer and scheduler prepared on it).
        output_dir: where ``checkpoint-<step>`` folders go.
        named_params: the trainable parameters by name (on the unwrapped model).
        save_adapter: writes the diffusers-format adapter into a folder.
        total_limit: keep at most this many checkpoints (None: all).
    """

    def __init__(
        self,
        accelerator,
        output_dir: str | Path,
        named_params: dict[str, torch.nn.Parameter],
        save_adapter: Callable[[str], None],
        total_limit: int | None = None,
    ):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.named_params = dict(named_params)
        self.save_adapter = save_adapter
        self.total_limit = total_limit
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    # accelerate hooks: the adapter replaces the (mostly frozen) full model in the checkpoint
    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            from safetensors.torch import save_file

            save_file(
                {n: p.detach().cpu().contiguous() for n, p in self.named_params.items()},
                str(Path(output_dir) / PARAMS_FILE),
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
                param.copy_(tensors[name].to(param.device, param.dtype))
        models.clear()

    def save(self, step: int, extra: dict[str, Any] | None = None) -> Path:
        """Write ``checkpoint-<step>`` atomically (all processes call this); returns its path."""
        acc = self.accelerator
        tmp = self.output_dir / f"{TMP_PREFIX}{step}"
        final = self.output_dir / f"{CHECKPOINT_PREFIX}{step}"
        if acc.is_main_process:
            for stale in self.output_dir.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json(tmp / STATE_FILE, {"step": int(step), **(extra or {})})
            if final.exists():  # re-saving a step after a resume: swap, never leave no checkpoint
                old = self.output_dir / f"{TMP_PREFIX}{step}-old"
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            self._prune()
        acc.wait_for_everyone()
        return final

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
