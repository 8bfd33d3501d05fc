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
import json
from pathlib import Path
from typing import Any, Sequence

Condition = Any  # a prompt (str) or a class label (int)


def _as_condition(value: Any, conditioning: str, where: str) -> Condition:
    if conditioning == "class":
        if isinstance(value, bool):
            raise ValueError(f"{where}: {value!r} is not a class label (a non-negative integer).")
        if isinstance(value, int):
            label = value
        elif isinstance(value, float) and value.is_integer():
            label = int(value)
        elif isinstance(value, str) and value.strip().lstrip("+").isdigit():
            label = int(value.strip())
        else:
            raise ValueError(f"{where}: {value!r} is not a class label (a non-negative integer).")
        if label < 0:
            raise ValueError(f"{where}: class label {label} is negative.")
        return label
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a non-empty prompt string; got {value!r}.")
    return value.strip()


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
            raise ValueError(
                f"{path}, line 1: the CSV header has no column {column!r} (columns: {reader.fieldnames}); "
                "set `--prompt_column`."
            )
        out = []
        for row in reader:
            out.append(_as_condition(row.get(column), conditioning, f"{path}, line {reader.line_num}"))
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
            raise ValueError(f"{where}: not valid JSON ({err.msg}).") from None
        if isinstance(value, dict):
            if column not in value:
                raise ValueError(
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
                    raise ValueError(f"`--prompts_split` {split!r} is not in {source!r} (splits: {list(data)}).")
                data = data[split]
        else:
            data = datasets.load_dataset(source, split=split)
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(
            f"`--prompts` {source!r} is neither a prompts file (.txt, .csv, .jsonl) nor a loadable `datasets` "
            f"dataset ({type(err).__name__}: {err}). Offline, save the dataset with `save_to_disk` "
            "and pass that folder."
        ) from err
    if column not in data.column_names:
        raise ValueError(
            f"`--prompts` {source!r} has no column {column!r} (columns: {data.column_names}); set `--prompt_column`."
        )
    return [_as_condition(v, conditioning, f"{source}, row {i}") for i, v in enumerate(data[column])]


def load_prompts(
    source: str | Path, *, conditioning: str = "text", column: str | None = None, split: str = "train"
) -> list[Condition]:
    """Read prompts (``conditioning='text'``) or class labels (``'class'``) from ``source``.

    Returns a non-empty list; raises ValueError for an empty source or a malformed entry (naming the line)."""
    if conditioning not in ("text", "class"):
        raise ValueError(f"`conditioning` must be 'text' or 'class'; got {conditioning!r}.")
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
            raise ValueError(
                f"`--prompts` file {str(path)!r} is not UTF-8 text (one prompt a line, or .csv / .jsonl)."
            ) from None
    elif suffix in (".txt", ".csv", ".jsonl", ".json"):
        raise ValueError(f"`--prompts` file {str(path)!r} does not exist.")
    else:
        out = _from_datasets(str(source), conditioning, column, split)
    if not out:
        raise ValueError(f"`--prompts` {str(source)!r} holds no prompts: add one per line (or row).")
    return out


def check_class_labels(labels: Sequence[Condition], num_classes: int | None, what: str = "--prompts") -> None:
    """Raise ValueError if a label is outside [0, num_classes) (no check when ``num_classes`` is None)."""
    if num_classes is None:
        return
    bad = [label for label in labels if not 0 <= int(label) < num_classes]
    if bad:
        raise ValueError(f"`{what}`: class label(s) {sorted(set(bad))[:5]} outside [0, {num_classes}) of this model.")


