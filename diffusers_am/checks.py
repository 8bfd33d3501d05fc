"""The small argument checks every entry point repeats, each with its one-line message.

Each returns the value in its plain Python type and raises ``ValueError`` naming the argument, e.g.
``positive_int(0, "batch_size")`` -> "`batch_size` must be a positive integer; got 0.". ``name`` is
written as the user spells it: ``"batch_size"`` for a Python argument, ``"--batch_size"`` for a flag.
An integer is an ``int`` or a numpy integer, never a bool and never a float such as 2.0.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable
from .errors import UserError


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_float(value: Any) -> float | None:
    """``float(value)`` for a number (a Python or numpy scalar, a one-element tensor); None for a bool, a
    string or anything ``float`` refuses."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1; else "`name` must be a positive integer; got ...."."""
    if not _is_int(value) or value < 1:
        raise UserError(f"`{name}` must be a positive integer; got {value!r}.")
    return int(value)


def int_at_least(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; else "`name` must be an integer >= minimum; got ...."."""
    if not _is_int(value) or value < minimum:
        raise UserError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def finite_float(value: Any, name: str) -> float:
    """``value`` (a number, not NaN or inf) as a float; else "`name` must be a finite number; got ...."."""
    number = _as_float(value)
    if number is None or not math.isfinite(number):
        raise UserError(f"`{name}` must be a finite number; got {value!r}.")
    return number


def positive_float(value: Any, name: str) -> float:
    """``value`` (a finite number > 0) as a float; else "`name` must be a finite number > 0; got ...."."""
    number = _as_float(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise UserError(f"`{name}` must be a finite number > 0; got {value!r}.")
    return number


def one_of(value: Any, name: str, choices: Iterable[str]) -> Any:
    """``value`` when it is one of ``choices``; else "`name` must be one of a, b, c; got ...."."""
    choices = tuple(choices)
    if value not in choices:
        raise UserError(f"`{name}` must be one of {', '.join(map(str, choices))}; got {value!r}.")
    return value
