"""Exceptions raised by accumfn. Each message names the problem and the fix.

Beside them, what every layer uses to raise or warn: the install hint of an optional
integration (``raise_missing``) and the ``stacklevel`` that points a warning at the user's
code (``caller_level``).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from .core import AccumState

__all__ = [
    "AccumError",
    "AccumulationConflictError",
    "CallOrderError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "LossError",
    "MissingDependencyError",
    "RankMismatchError",
    "StateFormatError",
    "StepError",
    "UnappliedWindowWarning",
]


class AccumError(Exception):
    """Base class of every error accumfn raises on purpose."""


class ConfigError(AccumError, ValueError):
    """An accumulation setting is out of range or of the wrong type."""


class AccumulationConflictError(ConfigError):
    """accumfn and another trainer (Lightning, Accelerate) were both asked to accumulate."""


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


class UnappliedWindowWarning(UserWarning):
    """A window's micro-batches were never applied: the program ended, or the accumulator
    (or the model) holding them was garbage-collected, with the window still open.

    A ``UserWarning``, shown by default (a ``ResourceWarning`` is hidden outside Python's
    development mode), since the lost micro-batches change the model that was trained.
    """


class MissingDependencyError(AccumError, ModuleNotFoundError):
    """An optional package a feature needs is not installed; the message names the extra."""


def install_hint(package: str, extra: str, feature: str) -> str:
    """``"<feature> needs <package>, which is not installed: pip install 'accumfn[<extra>]'"``."""
    return f"{feature} needs {package}, which is not installed: pip install 'accumfn[{extra}]'"


def raise_missing(
    error: ImportError, package: str, extra: str, feature: str, otherwise: str = ""
) -> NoReturn:
    """Turn ``error`` into a ``MissingDependencyError`` if ``package`` itself is missing.

    Any other import failure (a package that is installed but broken, or a missing package
    of its own) is raised unchanged, since installing the extra would not fix it.
    """
    missing = (getattr(error, "name", None) or "").split(".")[0]
    if missing != package.split(".")[0]:  # "ruamel.yaml": a missing "ruamel" counts
        raise error
    hint = install_hint(package, extra, feature)
    raise MissingDependencyError(f"{hint}{'; ' + otherwise if otherwise else ''}.") from error


def caller_level() -> int:
    """``stacklevel`` of the first frame outside accumfn, as seen from ``warnings.warn``."""
    here = inspect.currentframe()
    level, frame = 1, None if here is None else here.f_back  # the frame calling warn
    while frame is not None and frame.f_globals.get("__name__", "").startswith("accumfn"):
        level, frame = level + 1, frame.f_back
    return level
