"""``RunFolder``: which output folders the trainer writes into, and which files there are its own.

* The trainer writes only into an empty folder, a folder it creates, or a folder holding one of its own
  runs, recognised by the marker ``.diffusers-am-run.json``. Any other non-empty folder (a project
  folder, ``--output_dir .``) is refused with one line, with or without ``--overwrite_output_dir``.
* The marker lists every top-level entry (file or folder) the run writes, recorded before it is written.
  ``--overwrite_output_dir`` removes those entries and nothing else; files a user adds stay. The marker is
  read back as untrusted: an entry that is not the plain name of a child (:func:`is_plain_name`) makes the
  folder refused before anything is removed, and an entry that became a symlink is removed as a link.
* One trainer per folder: :class:`~.folder_lock.FolderLock` on ``.diffusers-am.lock`` inside it.

Only the main process claims the folder, writes into it and holds the lock.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from ..jsonio import dumps
from .disk import check_writable
from .folder_lock import FolderLock

MARKER_NAME = ".diffusers-am-run.json"
LOCK_NAME = ".diffusers-am.lock"
_OWNER = "diffusers-am"


def is_plain_name(name: object) -> bool:
    """Whether ``name`` names a direct child of a folder: a non-empty string without a path separator or NUL,
    not ``.`` or ``..`` (so never absolute, never outside the folder)."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name:
        return False
    return not any(sep and sep in name for sep in ("/", os.sep, os.altsep))


def _make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; returns the folders created, outermost first."""
    missing = []
    current = path.absolute()
    while not current.exists():
        missing.append(current)
        current = current.parent
    path.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


class RunFolder:
    """An output folder claimed by this trainer: checked, locked, its owned entries in the marker.

    Build it with :meth:`claim`; :meth:`release` at the end of the run (also after a failure)."""

    def __init__(self, path: Path, lock: FolderLock, created: list[Path]):
        self.path = path
        self.lock = lock
        self.created = created
        self.run_id: str | None = None
        """The id of the run this folder holds (None: none recorded yet)."""
        self._entries = self._read_marker()

    # -- claiming ---------------------------------------------------------------------------------
    @classmethod
    def claim(cls, path: str | Path, what: str = "`--output_dir`") -> "RunFolder":
        """Check that ``path`` may take a run (not a file, not somebody else's folder, writable) and lock it.

        Raises ValueError with one line: a file, a non-empty folder without the marker, a read-only
        folder, or a folder another live trainer holds."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"{what} {str(path)!r} is a file; pass a folder (a new one, or one of this trainer's).")
        if path.is_dir():
            entries = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
            if entries and MARKER_NAME not in entries:
                shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
                raise ValueError(
                    f"{what} {str(path)!r} is not empty ({shown}) and holds no diffusers-am run; pass a new or empty "
                    "folder (the trainer never writes among files it did not create, even with --overwrite_output_dir)."
                )
        check_writable(path, what)
        created = _make_dirs(path)
        try:
            lock = FolderLock(path / LOCK_NAME).acquire(what)
        except BaseException:
            _remove_empty(created)
            raise
        try:
            return cls(path, lock, created)
        except BaseException:
            lock.release()
            _remove_empty(created)
            raise

    # -- the marker -------------------------------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.path / MARKER_NAME

    def _read_marker(self) -> list[str]:
        if not self.marker.exists() and not self.marker.is_symlink():
            return []
        try:
            if self.marker.is_symlink() or not self.marker.is_file():
                raise ValueError("not a regular file")
            data = json.loads(self.marker.read_text(encoding="utf-8"))
            entries = data["entries"]
            if data.get("owner") != _OWNER or not isinstance(entries, list):
                raise ValueError("not a diffusers-am marker")
            bad = next((e for e in entries if not is_plain_name(e)), None)
            if bad is not None:
                raise ValueError(f"entry {bad!r} is not the plain name of a file or folder in it")
            run_id = data.get("run_id")
            if run_id is not None and not isinstance(run_id, str):
                raise ValueError(f"run_id {run_id!r} is not a string")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"the run marker {str(self.marker)!r} is damaged ({err}), so the trainer cannot tell which files "
                "here are its own and removes nothing; pass another `--output_dir`."
            ) from None
        self.run_id = run_id
        return list(entries)

    def _write_marker(self, entries: Iterable[str]) -> None:
        entries = sorted(set(entries))
        bad = [e for e in entries if not is_plain_name(e)]
        if bad:  # our own names are plain: anything else is a bug
            raise RuntimeError(f"run marker entries must be plain names in the folder; got {bad}")
        self._entries = entries
        data = {
            "owner": _OWNER,
            "format": 1,
            "updated": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
            "run_id": self.run_id,
            "entries": self._entries,
        }
        tmp = self.path / f"{MARKER_NAME}.tmp"
        tmp.write_text(dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.marker)

    @property
    def owned(self) -> list[str]:
        """Top-level entries (file or folder names) this trainer wrote here, as the marker lists them."""
        return list(self._entries)

    # -- writing ----------------------------------------------------------------------------------
    def check_unowned(self, names: Iterable[str]) -> None:
        """ValueError if one of ``names`` exists here but was not written by this trainer."""
        for name in names:
            if (self.path / name).exists() and name not in self._entries:
                raise ValueError(
                    f"`--output_dir` {str(self.path)!r} holds {name!r}, which this trainer did not write; "
                    "move it away or pass another `--output_dir`."
                )

    def start(self, names: Iterable[str], fresh: bool, run_id: str | None = None) -> list[str]:
        """Begin a run that will write ``names``: a ``fresh`` run first removes every entry the previous run
        here owned (a resumed one keeps them); ``run_id`` (the run's id, kept across its resumes) is recorded
        in the marker. Entries are plain names (checked when the marker is read); a symlink is removed as a
        link, never followed. Returns the names removed."""
        names = list(names)
        self.check_unowned(names)
        removed = []
        if run_id is not None:
            self.run_id = run_id
        if fresh and self._entries:
            old = list(self._entries)
            self._write_marker(old + names)  # a crash while removing still knows what is ours
            for name in old:
                target = self.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                    removed.append(name)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                    removed.append(name)
            self._write_marker(names)
        else:
            self._write_marker(self._entries + names)
        return removed

    def record(self, *names: str) -> None:
        """Add ``names`` to the marker before writing them (no-op for names already there)."""
        if not set(names) <= set(self._entries):
            self._write_marker(self._entries + list(names))

    def release(self) -> None:
        """Unlock; remove the folders :meth:`claim` created if nothing was written into them."""
        self.lock.release()
        _remove_empty(self.created)


def _remove_empty(created: list[Path]) -> None:
    """Remove the created folders, innermost first, as long as they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return
