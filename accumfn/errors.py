"""Exceptions raised by accumfn. Each message names the problem and the fix."""

from __future__ import annotations

__all__ = [
    "AccumError",
    "CallOrderError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "LossError",
    "MissingDependencyError",
    "StateFormatError",
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


class MissingDependencyError(AccumError, ModuleNotFoundError):
    """An optional package a feature needs is not installed; the message names the extra."""
