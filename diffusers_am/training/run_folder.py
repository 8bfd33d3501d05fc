"""The output folder kept safe: which folders the trainer writes into and which files there are its own
(``RunFolder``), one trainer per folder (``FolderLock``), and the claim at set-up (:func:`claim_run`).

* The trainer writes only into an empty folder, a folder it creates, or a folder holding one of its own
  runs, recognised by the marker ``.diffusers-am-run.json``. Any other non-empty folder (a project
  folder, ``--output_dir .``) is refused with one line, with or without ``--overwrite_output_dir``.
* The marker lists every top-level entry (file or folder) the run writes, recorded before it is written.
  ``--overwrite_output_dir`` removes those entries and nothing else; files a user adds stay. The marker is
  read back as untrusted: an entry that is not the plain name of a child (:func:`is_plain_name`) makes the
  folder refused before anything is removed, and an entry that became a symlink is removed as a link.
* One trainer per folder: :class:`FolderLock` on ``.diffusers-am.lock`` inside it.

Only the main process claims the folder, writes into it and holds the lock.

The lock is a file holding its holder's pid, host and start time. Where the OS has ``fcntl`` (Linux,
macOS) the holder also keeps an exclusive ``flock`` on it, which the kernel drops when the process dies,
so a lock file left by a killed trainer is recognised as stale whatever its pid says. Elsewhere a lock
is stale when it names this host and a pid that is no longer running. A stale lock is taken over with a
warning; a live one makes the second trainer stop at once with one line naming the holder.

What a run starts from, decided on the main process before anything is loaded: the output folder (claimed and
locked), the checkpoint to resume from (checked against the config, :func:`~.checkpoints.check_resume_config`) and
the Hub repo (created or checked, :func:`~.outputs.prepare_repo`). The other processes learn the outcome; a refusal
is one line on every process, and nothing is written but the lock.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..errors import MainProcessError, UserError
from ..jsonio import dumps
from .checkpoints import check_resume_config, list_checkpoints, read_trainer_state, resolve_checkpoint
from .config import TrainingConfig
from .console import warn
from .disk import check_writable
from .layout import ADAPTER_NAME, LOCK_NAME, LOG_NAME, MARKER_NAME, SUMMARY_NAME

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
            raise UserError(f"{what} {str(path)!r} is a file; pass a folder (a new one, or one of this trainer's).")
        if path.is_dir():
            entries = sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME)
            if entries and MARKER_NAME not in entries:
                shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
                raise UserError(
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
                raise UserError("not a regular file")
            data = json.loads(self.marker.read_text(encoding="utf-8"))
            entries = data["entries"]
            if data.get("owner") != _OWNER or not isinstance(entries, list):
                raise UserError("not a diffusers-am marker")
            bad = next((e for e in entries if not is_plain_name(e)), None)
            if bad is not None:
                raise UserError(f"entry {bad!r} is not the plain name of a file or folder in it")
            run_id = data.get("run_id")
            if run_id is not None and not isinstance(run_id, str):
                raise UserError(f"run_id {run_id!r} is not a string")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(
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
                raise UserError(
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


# -- one trainer per folder: the lock ------------------------------------------------------------------------

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or cannot tell: assume it runs)
    return True


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def describe_holder(info: dict[str, Any]) -> str:
    """``pid 123 on host h, since 2024-01-01 12:00:00`` from a lock file's content."""
    since = f", since {info['started']}" if info.get("started") else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{since}"


class FolderLock:
    """An exclusive lock on ``path`` (a file); :meth:`acquire` it, :meth:`release` it when done."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def _read(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW)
        except OSError:
            return {}
        try:
            with os.fdopen(fd, "rb") as handle:
                info = json.loads(handle.read(65536).decode("utf-8") or "{}")
            return info if isinstance(info, dict) else {}
        except (OSError, ValueError):
            return {}

    def _open(self, flags: int, what: str) -> int:
        """Open the lock file without following a symlink; ValueError (one line) when it is a symlink or not a
        regular file (a lock file is never written through a link)."""
        try:
            fd = os.open(self.path, flags | _NOFOLLOW, 0o644)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO) and not self.path.is_symlink():
                raise
            fd = None
        if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
            if fd is not None:
                os.close(fd)
            kind = "a symbolic link" if self.path.is_symlink() else "not a regular file"
            raise UserError(
                f"the lock file {str(self.path)!r} of {what} is {kind}, which the trainer never writes through; "
                "delete it (or pass another " + what + ")."
            )
        return fd

    def _refuse(self, info: dict[str, Any], what: str) -> None:
        raise UserError(
            f"{what} {str(self.path.parent)!r} is in use by another trainer ({describe_holder(info)}); wait for it "
            f"to finish or pass another {what}. If that trainer is gone, delete {str(self.path)!r}."
        )

    def acquire(self, what: str = "`--output_dir`") -> "FolderLock":
        """Take the lock (taking over a stale one with a warning); ValueError naming a live holder."""
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(sep=" ", timespec="seconds"),
        }
        if fcntl is None:
            return self._acquire_by_pid(me, what)
        while True:
            fd = self._open(os.O_RDWR | os.O_CREAT, what)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(self._read(), what)
            except OSError:  # no flock on this file system (some network mounts): fall back to the pid
                info = self._read()
                if info.get("host") == me["host"] and isinstance(info.get("pid"), int) and _pid_running(info["pid"]):
                    os.close(fd)
                    self._refuse(info, what)
            try:  # the file may have been removed and re-created by a holder that just released it
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = self._read()
        if previous.get("pid") is not None:
            warn(f"took over the stale lock {str(self.path)!r} of {describe_holder(previous)}: that trainer is gone.")
        self._fd = fd
        self._write(me)
        return self

    def _acquire_by_pid(self, me: dict[str, Any], what: str) -> "FolderLock":
        try:
            fd = self._open(os.O_RDWR | os.O_CREAT | os.O_EXCL, what)
        except FileExistsError:
            info = self._read()
            if info.get("host") == me["host"] and isinstance(info.get("pid"), int) and not _pid_running(info["pid"]):
                warn(f"took over the stale lock {str(self.path)!r} of {describe_holder(info)}: that process is gone.")
                fd = self._open(os.O_RDWR | os.O_TRUNC, what)
            else:
                self._refuse(info, what)
        self._fd = fd
        self._write(me)
        return self

    def _write(self, info: dict[str, Any]) -> None:
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, (dumps(info) + "\n").encode())
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when not held). Never raises: when the file cannot
        be removed (the folder turned read-only) it is emptied, so it names no holder, and the ``flock`` goes
        with the closed descriptor; the next trainer takes it over."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
        finally:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


# -- claiming the folder at set-up ---------------------------------------------------------------------------

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
            raise UserError(
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
        raise UserError(
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
                from .outputs import prepare_repo

                hub_repo = prepare_repo(repo_id, token=config.hub_token)
        except UserError as err:
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
