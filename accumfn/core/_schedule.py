"""Accumulation schedules: how many micro-batches make the window that opens next.

A schedule is asked only when a window opens, so a change never splits a window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import attrs

from ..errors import ConfigError
from ._checks import check_count

__all__ = ["ByEpoch", "ByStep", "Constant", "Schedule", "StepsSpec", "schedule_from"]


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
            raise ConfigError(
                f"the accumulation schedule returned {value!r} for effective step "
                f"{effective_step}; it must return an int >= 1."
            ) from exc

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "callable", "name": getattr(self.fn, "__qualname__", repr(self.fn))}


Schedule: TypeAlias = Constant | ByEpoch | ByStep
StepsSpec: TypeAlias = int | Mapping[int, int] | Callable[[int], int] | Schedule


def schedule_from(steps: object) -> Schedule:
    """Turn what users pass as ``steps`` (int, {epoch: steps}, callable) into a schedule."""
    if isinstance(steps, (Constant, ByEpoch, ByStep)):
        return steps
    if isinstance(steps, Mapping):
        return ByEpoch(steps)
    if callable(steps):
        return ByStep(steps)
    return Constant(steps)
