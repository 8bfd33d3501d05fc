"""How the command lines end: ``UserError`` (a mistake in what the user gave), ``RunStopped`` (a run that
stopped early), and the exit codes. No torch is imported here (``--help`` stays quick).

``python -m diffusers_am.train`` and ``python -m diffusers_am.evaluate`` print a :class:`UserError` as
``error: <message>`` and exit 2, with no traceback: the message names the flag, file or line and the fix. Any
other exception (a ``ValueError`` from deep inside torch, diffusers or peft included) is a bug, ours or a
library's: its traceback is printed, then :data:`BUG_LINE`, and the exit code is 1. The exit codes (the
README's table):

    0    done
    1    a bug (a Python traceback, then :data:`BUG_LINE`), or an output could not be written mid-run
         (one line)
    2    a bad input (:class:`UserError`): one ``error: ...`` line naming the argument, file or line; nothing
         written
    3    nothing was trained: every update was skipped as NaN / inf (one line; no adapter written)
    130  stopped by SIGINT (Ctrl-C); 143 by SIGTERM (128 + the signal number)
"""

from __future__ import annotations

BUG_LINE = (
    "This is not a mistake in your input but a bug: in your own code if the traceback above ends there (a reward, "
    "a callback), else in diffusers-am or a library it calls; please report the latter on the diffusers-am issue "
    "tracker with the traceback above, the command you ran and `pip freeze`."
)
"""The line printed after the traceback of an exception that is not a :class:`UserError`."""


class UserError(ValueError):
    """A bad input the user can fix: a flag, a config or prompts file, a checkpoint, a model folder, their own
    reward's output. The message is one line naming it and the fix. A ``ValueError`` subclass, so code that
    catches ``ValueError`` around the Python API keeps working."""


class RunStopped(Exception):
    """The run stopped before its end: interrupted (exit 128 + signal number), or an output could not be
    written (exit 1). The message says what was kept and how to continue."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class MainProcessError(UserError):
    """A set-up check the main process failed, re-raised on the other processes (which print nothing)."""
