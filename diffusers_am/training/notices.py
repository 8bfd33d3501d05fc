"""One-line notices on stderr for the person running the trainer (``warning: ...``).

Python's ``warnings`` print the warning's source line too; these are single lines, printed by the calling
process (the trainer calls them on the main process only).
"""

from __future__ import annotations

import os
import sys


def prints_here() -> bool:
    """Whether this process prints notices: not under a launcher, or its local rank 0 (every rank of
    ``accelerate launch`` meets the same signals and errors; one line is enough)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def warn(message: str) -> None:
    """Print ``warning: <message>`` as one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
