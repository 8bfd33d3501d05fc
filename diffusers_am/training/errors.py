"""How a run ends early for a reason the user can act on (not a bug): one line and an exit code.

``python -m diffusers_am.train`` prints ``str(error)`` as one line on stderr and exits with
``error.exit_code``; no traceback.
"""

from __future__ import annotations


class RunStopped(Exception):
    """The run stopped before its end: interrupted (exit 128 + signal number), or an output could not be
    written (exit 1). The message says what was kept and how to continue."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class MainProcessError(ValueError):
    """A set-up check the main process failed, re-raised on the other processes (which print nothing)."""
