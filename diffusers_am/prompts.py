"""The one prompt loader of the trainer (``--prompts``, ``--validation_prompts``) and of
``python -m diffusers_am.evaluate`` (``--prompts``): text prompts or class labels.

Sources:
  * ``.txt`` (or any other file): one prompt (or class label) per line; blank lines and lines starting
    with ``#`` are skipped;
  * ``.csv``: a header row and a ``prompt`` column (``--prompt_column`` to pick another);
  * ``.jsonl`` / ``.json``: one JSON value per line, an object with the column, or a bare string / integer;
  * a folder written by ``datasets.Dataset.save_to_disk``, or any name ``datasets.load_dataset`` takes.
Class-conditional models take integer labels. A malformed entry raises ValueError naming its line; a
binary (non-UTF-8) file raises the one-line ValueError naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence
from .errors import UserError

Condition = Any  # a prompt (str) or a class label (int)


MAX_PROMPT_CHARS = 10_000
"""The longest prompt accepted, in characters: far beyond what any supported text encoder reads (at most 512
tokens), so a longer line is a wrong file (a log, a data dump), not a prompt."""
MAX_LABEL_DIGITS = 18
"""The most digits a class label may have (labels index a model's classes)."""


def _as_condition(value: Any, conditioning: str, where: str) -> Condition:
    """``value`` as a class label (a non-negative integer of ASCII digits) or a prompt (a non-empty string of
    at most :data:`MAX_PROMPT_CHARS` characters); ValueError starting with ``where`` (file and line) else."""
    if conditioning == "class":
        if isinstance(value, bool):
            raise UserError(f"{where}: {_shown(value)} is not a class label (a non-negative integer).")
        if isinstance(value, int):
            label = value
        elif isinstance(value, float) and value.is_integer():
            label = int(value)
        elif isinstance(value, str) and _is_ascii_integer(value.strip().lstrip("+")):
            label = int(value.strip())
        else:
            raise UserError(
                f"{where}: {_shown(value)} is not a class label; a label is a non-negative integer written with "
                f"the digits 0-9 (at most {MAX_LABEL_DIGITS} of them)."
            )
        if label < 0:
            raise UserError(f"{where}: class label {label} is negative.")
        return label
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: expected a non-empty prompt string; got {_shown(value)}.")
    if len(value.strip()) > MAX_PROMPT_CHARS:
        raise UserError(
            f"{where}: the prompt is {len(value.strip())} characters long; a prompt is at most {MAX_PROMPT_CHARS} "
            "characters (one prompt a line; text encoders read at most 512 tokens)."
        )
    return value.strip()


def _is_ascii_integer(text: str) -> bool:
    """Whether ``text`` is 1 to MAX_LABEL_DIGITS ASCII digits (``str.isdigit`` also takes '٣' and '²')."""
    return 0 < len(text) <= MAX_LABEL_DIGITS and text.isascii() and text.isdigit()


def _shown(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to about ``limit`` characters (a 1 MB line stays one line of error)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _from_txt(path: Path, conditioning: str) -> list[Condition]:
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip() and not line.strip().startswith("#"):
            out.append(_as_condition(line.strip(), conditioning, f"{path}, line {number}"))
    return out


def _from_csv(path: Path, conditioning: str, column: str) -> list[Condition]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            raise UserError(
                f"{path}, line 1: the CSV header has no column {column!r} (columns: {reader.fieldnames}); "
                "set `--prompt_column`."
            )
        out = []
        try:
            for row in reader:
                out.append(_as_condition(row.get(column), conditioning, f"{path}, line {reader.line_num}"))
        except csv.Error as err:  # e.g. a field over csv's 128 KiB limit
            raise UserError(
                f"{path}, line {reader.line_num + 1}: not a CSV row of prompts ({err}); one prompt (at most "
                f"{MAX_PROMPT_CHARS} characters) per row."
            ) from None
    return out


def _from_jsonl(path: Path, conditioning: str, column: str) -> list[Condition]:
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg}).") from None
        if isinstance(value, dict):
            if column not in value:
                raise UserError(
                    f"{where}: the object has no key {column!r} (keys: {sorted(value)}); set `--prompt_column`."
                )
            value = value[column]
        out.append(_as_condition(value, conditioning, where))
    return out


def _from_datasets(source: str, conditioning: str, column: str, split: str) -> list[Condition]:
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise UserError(f"`--prompts_split` {split!r} is not in {source!r} (splits: {list(data)}).")
                data = data[split]
        else:
            data = datasets.load_dataset(source, split=split)
    except UserError:
        raise
    except Exception as err:
        raise UserError(
            f"`--prompts` {source!r} is neither a prompts file (.txt, .csv, .jsonl) nor a loadable `datasets` "
            f"dataset ({type(err).__name__}: {err}). Offline, save the dataset with `save_to_disk` "
            "and pass that folder."
        ) from err
    if column not in data.column_names:
        raise UserError(
            f"`--prompts` {source!r} has no column {column!r} (columns: {data.column_names}); set `--prompt_column`."
        )
    return [_as_condition(v, conditioning, f"{source}, row {i}") for i, v in enumerate(data[column])]


def load_prompts(
    source: str | Path, *, conditioning: str = "text", column: str | None = None, split: str = "train"
) -> list[Condition]:
    """Read prompts (``conditioning='text'``) or class labels (``'class'``) from ``source``.

    Returns a non-empty list; raises ValueError for an empty source or a malformed entry (naming the line)."""
    if conditioning not in ("text", "class"):
        raise UserError(f"`conditioning` must be 'text' or 'class'; got {conditioning!r}.")
    column = column or ("label" if conditioning == "class" else "prompt")
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        try:
            if suffix == ".csv":
                out = _from_csv(path, conditioning, column)
            elif suffix in (".jsonl", ".json"):
                out = _from_jsonl(path, conditioning, column)
            else:
                out = _from_txt(path, conditioning)
        except UnicodeDecodeError:
            raise UserError(
                f"`--prompts` file {str(path)!r} is not UTF-8 text (one prompt a line, or .csv / .jsonl)."
            ) from None
    elif suffix in (".txt", ".csv", ".jsonl", ".json"):
        raise UserError(f"`--prompts` file {str(path)!r} does not exist.")
    else:
        out = _from_datasets(str(source), conditioning, column, split)
    if not out:
        raise UserError(f"`--prompts` {str(source)!r} holds no prompts: add one per line (or row).")
    return out


def check_class_labels(labels: Sequence[Condition], num_classes: int | None, what: str = "--prompts") -> None:
    """Raise ValueError if a label is outside [0, num_classes) (no check when ``num_classes`` is None)."""
    if num_classes is None:
        return
    bad = [label for label in labels if not 0 <= int(label) < num_classes]
    if bad:
        raise UserError(f"`{what}`: class label(s) {sorted(set(bad))[:5]} outside [0, {num_classes}) of this model.")


class PromptSampler:
    """Draws batches of prompts, reproducibly: the batch of ``slot`` in update ``step`` depends only on
    (seed, step, slot), so a resumed run draws exactly what a straight run would. The trainer's slot is
    ``process_index * gradient_accumulation_steps + micro_batch``: P processes x G micro-batches see the
    same batches as 1 process x P*G micro-batches."""

    def __init__(self, prompts: Sequence[Condition], seed: int = 0):
        if not prompts:
            raise UserError("`prompts` must not be empty.")
        self.prompts = list(prompts)
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, step: int, batch_size: int, slot: int = 0) -> list[Condition]:
        """``batch_size`` prompts for update ``step`` and micro-batch slot ``slot``."""
        import torch

        gen = torch.Generator().manual_seed(derive_seed(self.seed, "prompts", step, slot))
        index = torch.randint(len(self.prompts), (batch_size,), generator=gen)
        return [self.prompts[i] for i in index.tolist()]


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed from a base seed and a tuple of labels (stable across runs and processes)."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
