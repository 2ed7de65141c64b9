"""Accumulation schedules: how many micro-batches make the window that opens next.

A schedule is asked only when a window opens, so a change never splits a window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import attrs

from ..errors import ConfigError
from ._checks import check_count

__all__ = [
    "ByEpoch",
    "ByStep",
    "CallerClosed",
    "Constant",
    "Schedule",
    "StepsSpec",
    "schedule_from",
]

_CALLER_HINT = (
    "steps=None (windows the caller closes with is_final_batch=True) is for the whole run, "
    "not for some epochs or steps"
)


def _steps(value: object) -> int:
    return check_count("steps", value)


@attrs.frozen
class Constant:
    """The same window size for the whole run."""

    steps: int = attrs.field(converter=_steps)

    def window(self, epoch: int, effective_step: int) -> int:
        return self.steps

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "constant", "steps": self.steps}


def _table(value: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(
            f"an epoch schedule must be a non-empty mapping {{epoch: steps}}, got {value!r}."
        )
    if any(steps is None for steps in value.values()):
        raise ConfigError(
            f"an epoch schedule's steps must be ints >= 1, got {dict(value)!r}: {_CALLER_HINT}; "
            f"pass steps=None alone, or an int for every epoch."
        )
    rows = sorted(
        (check_count("schedule epoch", epoch, minimum=0), check_count("schedule steps", steps))
        for epoch, steps in value.items()
    )
    return tuple(rows)


@attrs.frozen
class ByEpoch:
    """Window size by epoch, as Lightning's ``GradientAccumulationScheduler``.

    ``{0: 8, 4: 4}`` accumulates 8 micro-batches in epochs 0-3 and 4 from epoch 4 on.
    Epochs before the first key use 1, as Lightning does.
    """

    table: tuple[tuple[int, int], ...] = attrs.field(converter=_table)

    def window(self, epoch: int, effective_step: int) -> int:
        steps = 1
        for start, size in self.table:
            if epoch >= start:
                steps = size
        return steps

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "epochs", "table": [[epoch, steps] for epoch, steps in self.table]}


@attrs.frozen
class ByStep:
    """Window size from a callable of the effective step, as optax's ``every_k_schedule``.

    A callable cannot be serialized: a state saved with one must be given it again on load.
    """

    fn: Callable[[int], int]

    def window(self, epoch: int, effective_step: int) -> int:
        value = self.fn(effective_step)
        try:
            return check_count("steps", value)
        except ConfigError as exc:
            hint = f": {_CALLER_HINT}" if value is None else ""
            raise ConfigError(
                f"the accumulation schedule returned {value!r} for effective step "
                f"{effective_step}; it must return an int >= 1{hint}."
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "callable", "name": getattr(self.fn, "__qualname__", repr(self.fn))}


@attrs.frozen
class CallerClosed:
    """No planned size (``steps=None``): each window closes when the caller says so, with
    ``is_final_batch=True`` on its last micro-batch or with ``flush``; windows may hold any
    number of micro-batches, a different one each time (RL rollouts split as they come).

    Its window size is 0, "none planned": mean-mode losses are not divided while the window
    is open, and the close rescales by 1/k for the k micro-batches it held (over all ranks).
    """

    def window(self, epoch: int, effective_step: int) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "caller"}


Schedule: TypeAlias = Constant | ByEpoch | ByStep | CallerClosed
StepsSpec: TypeAlias = int | Mapping[int, int] | Callable[[int], int] | Schedule | None


def schedule_from(steps: object) -> Schedule:
    """Turn what users pass as ``steps`` (int, {epoch: steps}, callable, None) into a schedule."""
    if isinstance(steps, (Constant, ByEpoch, ByStep, CallerClosed)):
        return steps
    if steps is None:
        return CallerClosed()
    if isinstance(steps, Mapping):
        return ByEpoch(steps)
    if callable(steps):
        return ByStep(steps)
    return Constant(steps)
