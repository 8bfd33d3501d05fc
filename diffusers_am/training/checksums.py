"""SHA-256 checksums of the files in a folder, recorded when written and verified when read back.

A checkpoint records ``{relative path: {"sha256": ..., "bytes": ...}}`` of every file it holds; resuming
verifies them, so damaged bytes (a disk error, a partial copy) are found before they are trained on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

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
