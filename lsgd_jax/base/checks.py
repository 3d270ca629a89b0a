"""Argument checks shared by every layer: an integer or a real number in a range, never a
bool (``True`` is an ``int`` to Python, and a flag's ``true`` must not pass for 1).

Each check raises naming the argument, the value it got and what would be valid, so the
layers above need not word the same check again. Standard library only: the lowest layer.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any


def is_integer(value: Any) -> bool:
    """An integer (Python's or NumPy's), not a bool."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def is_real(value: Any) -> bool:
    """A real number (int, float or NumPy's), not a bool and not a string."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(name: str, value: Any, *, low: int = 1, high: int | None = None,
            error: type[Exception] = ValueError) -> int:
    """``value`` as an ``int`` when it is an integer in ``[low, high)`` (no upper bound when
    ``high`` is None); otherwise ``error``, e.g. "steps must be a positive integer, got 0".
    """
    if is_integer(value):
        number = operator.index(value)
        if number >= low and (high is None or number < high):
            return number
    raise error(f"{name} must be {describe_integer(low, high)}, got {value!r}")


def describe_integer(low: int = 1, high: int | None = None) -> str:
    """What :func:`integer` accepts, in words: "a positive integer", "an integer in [0, 4)"."""
    if high is not None:
        return f"an integer in [{low}, {high})"
    return {1: "a positive integer", 0: "an integer >= 0"}.get(low, f"an integer >= {low}")


def real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
         open_low: bool = False, open_high: bool = False, traced_ok: bool = False
         ) -> float | None:
    """``value`` as a ``float`` when it is a finite real number in the range (``open_*``
    leaves a bound out); otherwise ``ValueError``, e.g. "momentum must be a number in
    [0, 1), got 1.5".

    With ``traced_ok``, a value not known yet (an array traced under ``jit``, as Optax's
    ``inject_hyperparams`` passes it) is let through and None returned; a 0-d array that is
    known is checked like a number.
    """
    number = None
    if is_real(value):
        number = float(value)
    elif getattr(value, "shape", None) == () and getattr(value.dtype, "kind", "") in "iuf":
        try:
            number = float(value)
        except TypeError:  # traced: known only when the program runs
            if traced_ok:
                return None
    if number is not None and math.isfinite(number) and (
            low is None or (number > low if open_low else number >= low)) and (
            high is None or (number < high if open_high else number <= high)):
        return number
    raise ValueError(f"{name} must be {describe_real(low, high, open_low, open_high)}, "
                     f"got {value!r}")


def describe_real(low: float | None = None, high: float | None = None, open_low: bool = False,
                  open_high: bool = False) -> str:
    """What :func:`real` accepts, in words: "a finite number >= 0", "a number in (0, 1]"."""
    if low is not None and high is not None:
        return (f"a number in {'(' if open_low else '['}{low:g}, {high:g}"
                f"{')' if open_high else ']'}")
    if low is not None:
        if low == 0 and open_low:
            return "a positive finite number"
        return f"a finite number {'>' if open_low else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if open_high else '<='} {high:g}"
    return "a finite number"
