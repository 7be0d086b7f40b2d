"""Errors that are the user's to fix (bad input, missing files, mismatched artefacts), and the range check
every entry point runs on its numbers before any work.

The CLI turns :class:`ClipleakError` into a one-line message and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import math


class ClipleakError(Exception):
    """A problem with the user's input that clipleak can explain in one sentence."""


def check_range(name: str, value: float | None, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, integer: bool = False) -> None:
    """Raise :class:`ClipleakError` unless ``value`` is a finite number in ``[low, high]`` (``(low, high]``
    with ``low_open``; a whole number with ``integer``). ``None`` (not given) passes. ``name`` is how the
    user gave it (``--lr``)."""
    if value is None:
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ClipleakError(f"{name} must be a number, got {value!r}") from None
    bad = isinstance(value, bool) or not math.isfinite(v) or (integer and v != int(v)) \
        or (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high)
    if bad:
        rules = ["a whole number" if integer else "a finite number"]
        if low is not None:
            rules.append(f"> {_num(low)}" if low_open else f">= {_num(low)}")
        if high is not None:
            rules.append(f"<= {_num(high)}")
        raise ClipleakError(f"{name} must be {' '.join(rules[:1])} {' and '.join(rules[1:])}".rstrip()
                            + f", got {value!r}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"
