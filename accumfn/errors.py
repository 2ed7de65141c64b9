"""Exceptions raised by accumfn. Each message names the problem and the fix."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .core import AccumState

__all__ = [
    "AccumError",
    "CallOrderError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "LossError",
    "MissingDependencyError",
    "RankMismatchError",
    "StateFormatError",
    "StepError",
]


class AccumError(Exception):
    """Base class of every error accumfn raises on purpose."""


class ConfigError(AccumError, ValueError):
    """An accumulation setting is out of range or of the wrong type."""


class LossError(AccumError, ValueError):
    """The loss handed to ``accumulate`` cannot be accumulated."""


class CallOrderError(AccumError, RuntimeError):
    """A step function was called when the state does not allow it."""


class StateFormatError(AccumError, ValueError):
    """A serialized state is malformed, from another format, or another run."""


class CheckpointError(AccumError, ValueError):
    """A checkpoint cannot be read, or does not fit the accumulator loading it."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """There is no checkpoint file at the path given (also a ``FileNotFoundError``)."""


class RankMismatchError(AccumError, RuntimeError):
    """The data-parallel ranks disagree about a window; raised on every rank that can tell."""


class StepError(AccumError, RuntimeError):
    """An optimizer or scheduler raised inside a window's step (the cause is chained).

    The window was finished anyway, so training can go on: ``state`` is the state to
    continue from (``GradientAccumulator`` takes it itself), ``applied`` says whether the
    window counts as applied (every optimizer stepped) or skipped.
    """

    def __init__(self, message: str, state: AccumState, applied: bool) -> None:
        super().__init__(message)
        self.state = state
        self.applied = applied

    def __reduce__(self) -> tuple[type[StepError], tuple[str, AccumState, bool]]:
        return type(self), (str(self), self.state, self.applied)


class MissingDependencyError(AccumError, ModuleNotFoundError):
    """An optional package a feature needs is not installed; the message names the extra."""
