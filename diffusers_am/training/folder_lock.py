"""``FolderLock``: one trainer per output folder.

The lock is a file holding its holder's pid, host and start time. Where the OS has ``fcntl`` (Linux,
macOS) the holder also keeps an exclusive ``flock`` on it, which the kernel drops when the process dies,
so a lock file left by a killed trainer is recognised as stale whatever its pid says. Elsewhere a lock
is stale when it names this host and a pid that is no longer running. A stale lock is taken over with a
warning; a live one makes the second trainer stop at once with one line naming the holder.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

from ..jsonio import dumps
from .notices import warn

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
            raise ValueError(
                f"the lock file {str(self.path)!r} of {what} is {kind}, which the trainer never writes through; "
                "delete it (or pass another " + what + ")."
            )
        return fd

    def _refuse(self, info: dict[str, Any], what: str) -> None:
        raise ValueError(
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
