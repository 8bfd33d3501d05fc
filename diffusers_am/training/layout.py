"""Every name a run writes into ``--output_dir``, in one place.

A run's top level: the adapter, card, grids, config, summary and logs (:func:`run_entries`, recorded in the
run marker before any is written), the ``validation/`` grids, the marker and lock of :mod:`.run_folder`, and
``checkpoint-<step>/`` folders (:mod:`.checkpoints`) holding the files named below.
"""

from __future__ import annotations

from pathlib import Path

# -- the finished run ----------------------------------------------------------------------------------
CONFIG_NAME = "training_config.json"
ADAPTER_NAME = "pytorch_lora_weights.safetensors"
CARD_NAME = "README.md"
GRID_NAME = "samples.png"
COMPARISON_NAME = "comparison.png"
"""The base | fine-tuned side-by-side grid of a finished run (output_dir's top level)."""
SUMMARY_NAME = "train_summary.json"
ADAPTER_TMP = ".tmp-adapter"
OUTPUT_NAMES = (ADAPTER_NAME, ADAPTER_TMP, CARD_NAME, GRID_NAME, COMPARISON_NAME, SUMMARY_NAME)
"""Top-level entries of output_dir written at the end of a run."""
LOG_NAME = "train_log.jsonl"
VALIDATION_LOG_NAME = "validation_log.jsonl"
VALIDATION_DIR = "validation"
BASE_GRID_NAME = f"{VALIDATION_DIR}/base.png"
"""The base model's validation grid (same noise and prompts as the fine-tuned ones)."""
FINAL_GRID_NAME = f"{VALIDATION_DIR}/final.png"
"""The fine-tuned model's validation grid after the last update (copied to :data:`GRID_NAME`)."""


def validation_grid_name(step: int) -> str:
    """The mid-run validation grid of update ``step``, relative to output_dir."""
    return f"{VALIDATION_DIR}/step-{step:06d}.png"


# -- the folder's own bookkeeping ----------------------------------------------------------------------
MARKER_NAME = ".diffusers-am-run.json"
LOCK_NAME = ".diffusers-am.lock"

# -- checkpoints ---------------------------------------------------------------------------------------
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"
STATE_FILE = "trainer_state.json"
PARAMS_FILE = "trainable_params.safetensors"
TRAINING_STATE = "training_state"
"""``training_state.safetensors`` / ``.json``: optimizer, LR schedule, EMA, gradient scaler (:mod:`.safe_state`)."""
SUPERSEDED_PREFIX = "superseded-"


def rng_file(process_index: int) -> str:
    """The file of one process's RNG states in a checkpoint."""
    return f"rng_state_{process_index}.safetensors"


def run_entries(logging_dir: str) -> list[str]:
    """Top-level entries of output_dir a run writes (listed in the run's marker before they are written);
    ``logging_dir`` is ``--logging_dir`` (its first part is the run's when it is relative and inside)."""
    names = [CONFIG_NAME, LOG_NAME, f"{LOG_NAME}.tmp", VALIDATION_LOG_NAME, f"{VALIDATION_LOG_NAME}.tmp",
             VALIDATION_DIR, *OUTPUT_NAMES]
    logging = Path(logging_dir)
    if not logging.is_absolute() and logging.parts and logging.parts[0] != "..":
        names.append(logging.parts[0])
    return names
