"""How a run ends early for a reason the user can act on (not a bug): one line and an exit code.

``python -m diffusers_am.train`` prints ``str(error)`` as one line on stderr and exits with
``error.exit_code``; no traceback. The exit codes of the trainer and of ``python -m diffusers_am.evaluate``
(the README's table):

    0    done
    1    a bug (a Python traceback), or an output could not be written mid-run (one line)
    2    a bad input: one ``error: ...`` line naming the argument, file or line; nothing written
    3    nothing was trained: every update was skipped as NaN / inf (one line; no adapter written)
    130  stopped by SIGINT (Ctrl-C); 143 by SIGTERM (128 + the signal number)
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


NOTHING_TRAINED_EXIT = 3
"""Exit code of a run whose every update was skipped (see :func:`nothing_trained`)."""


def nothing_trained(steps: int, reg_order: float) -> str:
    """The one line of a run whose ``steps`` updates were all skipped as non-finite."""
    hint = ""
    if reg_order < 1.5:
        hint = (
            f" (--reg_order {reg_order:g} is close to 1: its control |a|^(1/(p-1)) overflows float32; "
            "try 1.5 or more)"
        )
    return (
        f"all {steps} updates were skipped: the reward, the loss or the gradient was NaN or inf every time, so "
        "nothing was trained and no adapter was written (train_log.jsonl has each update's values). Check the "
        f"reward's output, --reward_scale and --learning_rate{hint}."
    )
