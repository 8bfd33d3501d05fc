"""File modes as the user's umask says.

safetensors (0.8) writes every file with mode 0600 (a private temporary file renamed into place), where every
other file the program writes gets ``0666 & ~umask`` (0644 under the usual umask 022). :func:`match_umask`
gives the files a run has just written (the adapter, a checkpoint, the prompt cache) the mode a plain
``open(..., "w")`` would have given them, before they are moved into place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or every regular file under a folder; links are neither followed nor changed)
    the mode ``0666 & ~umask``. Only for files this process has just written."""
    mode = 0o666 & ~current_umask()
    root = Path(path)
    files = [root] if not root.is_dir() or root.is_symlink() else [p for p in root.rglob("*")]
    for file in files:
        info = file.lstat()
        if stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) != mode:
            os.chmod(file, mode)
