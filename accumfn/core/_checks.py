"""Small argument checks shared by the core (no torch)."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Sequence

from ..errors import ConfigError

__all__ = ["check_choice", "check_count", "check_positive_float", "closest"]


def check_count(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` as an int if it is an integer >= ``minimum``, else raise ConfigError."""
    if type(value) is int and value >= minimum:  # the usual case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(
            f"{name} must be an int >= {minimum}, got {value!r} of type {type(value).__name__}; "
            f"pass a whole number such as {max(minimum, 1)}."
        )
    as_int = int(value)
    if as_int < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {as_int}.")
    return as_int


def check_positive_float(name: str, value: object, *, allow_none: bool) -> float | None:
    """Return ``value`` as a finite float > 0 (or None when allowed), else raise ConfigError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " or None to turn it off" if allow_none else ""
        raise ConfigError(
            f"{name} must be a positive number{hint}, got {value!r} of type {type(value).__name__}."
        )
    as_float = float(value)
    if not math.isfinite(as_float) or as_float <= 0:
        hint = "; use None to turn clipping off" if allow_none else ""
        raise ConfigError(f"{name} must be a finite number > 0, got {as_float}{hint}.")
    return as_float


def closest(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``word``, or ``""`` when none is."""
    match = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return f" (did you mean {match[0]!r}?)" if match else ""


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ConfigError listing them."""
    if isinstance(value, str) and value in choices:
        return value
    known = ", ".join(repr(choice) for choice in choices)
    hint = closest(value, choices, cutoff=0.5) if isinstance(value, str) else ""
    raise ConfigError(f"{name} must be one of {known}, got {value!r}{hint}.")
