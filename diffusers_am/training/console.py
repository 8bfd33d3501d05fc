"""What the person running the trainer sees printed: one-line notices, and lines kept above the progress bar.

Lines printed while the progress bar runs: a callback's ``print``, a warning, the trainer's own notes.

tqdm redraws its bar in place (``\r``), so a plain ``print`` during the updates lands on the bar's line.
:func:`lines_above_the_bar` sends every complete line written to ``sys.stdout`` / ``sys.stderr`` through
``tqdm.write`` (the bar is cleared, the line printed, the bar redrawn): tqdm's documented way to print
beside a bar, applied to code that does not know about the bar (callbacks).

One-line notices on stderr for the person running the trainer (``warning: ...``).

Python's ``warnings`` print the warning's source line too; these are single lines, printed by the calling
process (the trainer calls them on the main process only).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator, TextIO


class _LinesAboveTheBar:
    """A text stream that prints complete lines through ``tqdm.write`` to ``stream`` (a partial line waits
    for its newline, or for ``flush``)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.pending = ""

    def write(self, text: str) -> int:
        from tqdm.auto import tqdm

        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            tqdm.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:
        from tqdm.auto import tqdm

        if self.pending:
            tqdm.write(self.pending, file=self.stream, end="")
            self.pending = ""
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty, fileno ... of the real stream
        return getattr(self.stream, name)


@contextlib.contextmanager
def lines_above_the_bar() -> Iterator[TextIO]:
    """Inside: ``sys.stdout`` and ``sys.stderr`` print whole lines above a tqdm bar. Yields the real stderr,
    which the bar itself must write to."""
    stdout, stderr = sys.stdout, sys.stderr
    out, err = _LinesAboveTheBar(stdout), _LinesAboveTheBar(stderr)
    sys.stdout, sys.stderr = out, err
    try:
        yield stderr
    finally:
        out.flush()
        err.flush()
        sys.stdout, sys.stderr = stdout, stderr


# -- one-line notices ----------------------------------------------------------------------------------------

def prints_here() -> bool:
    """Whether this process prints notices: not under a launcher, or its local rank 0 (every rank of
    ``accelerate launch`` meets the same signals and errors; one line is enough)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def warn(message: str) -> None:
    """Print ``warning: <message>`` as one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
