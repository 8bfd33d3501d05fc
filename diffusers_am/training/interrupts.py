"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop).

While updates run, :class:`StopSignals` only records the signal: the trainer finishes the current update,
agrees with the other processes to stop after that same update (:func:`agree_to_stop`), writes a
checkpoint and the adapter so far, and exits with ``128 + signal number`` (130 for SIGINT, 143 for
SIGTERM) after one line saying how to resume. A second Ctrl-C aborts at once (the last complete
checkpoint stays); a SIGINT within :data:`DUPLICATE_WINDOW_S` of the first is the same Ctrl-C delivered
twice (a terminal signals the launcher's whole process group, and ``accelerate launch`` / torchrun forwards
it to the workers again) and is ignored. Outside the updates (set-up, final outputs) there is nothing to
finish, and a signal raises :class:`Interrupted` right away.

Under ``accelerate launch`` the launcher kills its workers ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds
(default 30) after forwarding the signal: raise it when one update and a checkpoint take longer.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator

from .collectives import max_over_processes
from .notices import prints_here, warn

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DUPLICATE_WINDOW_S = 1.0
"""A SIGINT this soon after the first is the same Ctrl-C (forwarded by a launcher), not a second one."""


class Interrupted(BaseException):
    """A stop signal arrived where the trainer does not wait for an update to finish.

    A BaseException, as KeyboardInterrupt: the ``except Exception`` of a user's reward wrapper, a save's
    full-disk handler or a library's retry loop must not turn a stop into an error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Context manager installing SIGINT / SIGTERM handlers (main thread only; restored on exit).

    ``requested`` is the first signal number received while :meth:`deferred` is active (0: none)."""

    def __init__(self) -> None:
        self.requested = 0
        self._requested_at = 0.0
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if not self._deferring:
            raise Interrupted(signum)
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self._requested_at > DUPLICATE_WINDOW_S:
                raise KeyboardInterrupt  # a second Ctrl-C: abort now
            return
        self.requested, self._requested_at = signum, time.monotonic()
        if prints_here():
            warn(
                f"{signal.Signals(signum).name} received: stopping after the current update, then writing a "
                "checkpoint and the adapter (Ctrl-C again aborts at once)."
            )

    @contextlib.contextmanager
    def stopping(self, signum: int) -> Iterator[None]:
        """While writing what a stop by ``signum`` (raised as :class:`Interrupted`) keeps: further signals are
        deferred, and a second Ctrl-C aborts as it does after a stop requested between updates."""
        self.requested, self._requested_at = signum, time.monotonic()
        with self.deferred():
            yield

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within the block a signal only sets ``requested``; the loop decides when to stop."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False


def agree_to_stop(accelerator, requested: int) -> int:
    """The signal number every process stops for (0: go on): the largest one any process received, so all
    ranks stop after the same update (one small gather per call on several processes)."""
    return max_over_processes(accelerator, requested)


def signal_name(signum: int) -> str:
    """``SIGINT`` / ``SIGTERM`` for a signal number."""
    return signal.Signals(signum).name
