"""accumfn: gradient accumulation that is provably the same as large-batch training.

Functional core (``init``, ``accumulate``, ``apply_step``) over an immutable ``AccumState``,
and the ``GradientAccumulator`` object API built on it.

Names are imported on first use, so ``import accumfn`` (and the ``accumfn`` command) does
not import torch until something that needs it is touched.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .accumulate import accumulate, check_loss, flush, micro_step_context, prepare_forward
    from .accumulator import AccumulationStats, GradientAccumulator
    from .checkpoint import load_checkpoint, save_checkpoint
    from .config import AccumulationConfig
    from .core import AccumConfig, AccumState, ByEpoch, ByStep, Constant, Normalization, init
    from .effects import StepReport, apply_step, reset_epoch, step_window
    from .errors import (
        AccumError,
        CallOrderError,
        CheckpointError,
        CheckpointNotFoundError,
        ConfigError,
        LossError,
        MissingDependencyError,
        RankMismatchError,
        StateFormatError,
        StepError,
    )
    from .lightning import AccumulationConflictError
    from .lr import scale_lr
    from .metrics import (
        CallableSink,
        JsonlSink,
        MetricsStepError,
        MetricsTracker,
        TensorBoardSink,
        WandbSink,
    )

__version__ = "0.1.0"

_HOMES: dict[str, tuple[str, ...]] = {
    ".accumulate": ("accumulate", "check_loss", "flush", "micro_step_context", "prepare_forward"),
    ".accumulator": ("AccumulationStats", "GradientAccumulator"),
    ".checkpoint": ("load_checkpoint", "save_checkpoint"),
    ".config": ("AccumulationConfig",),
    ".core": (
        "AccumConfig",
        "AccumState",
        "ByEpoch",
        "ByStep",
        "Constant",
        "Normalization",
        "init",
    ),
    ".effects": ("StepReport", "apply_step", "reset_epoch", "step_window"),
    ".errors": (
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
    ),
    ".lightning": ("AccumulationConflictError",),
    ".lr": ("scale_lr",),
    ".metrics": (
        "CallableSink",
        "JsonlSink",
        "MetricsStepError",
        "MetricsTracker",
        "TensorBoardSink",
        "WandbSink",
    ),
}
"""Where each public name lives (the same as the imports above, which type checkers read)."""

_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "AccumConfig",
    "AccumError",
    "AccumState",
    "AccumulationConfig",
    "AccumulationConflictError",
    "AccumulationStats",
    "ByEpoch",
    "ByStep",
    "CallOrderError",
    "CallableSink",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "Constant",
    "GradientAccumulator",
    "JsonlSink",
    "LossError",
    "MetricsStepError",
    "MetricsTracker",
    "MissingDependencyError",
    "Normalization",
    "RankMismatchError",
    "StateFormatError",
    "StepError",
    "StepReport",
    "TensorBoardSink",
    "WandbSink",
    "__version__",
    "accumulate",
    "apply_step",
    "check_loss",
    "flush",
    "init",
    "load_checkpoint",
    "micro_step_context",
    "prepare_forward",
    "reset_epoch",
    "save_checkpoint",
    "scale_lr",
    "step_window",
]


_SUBMODULES = frozenset(
    {"checkpoint", "config", "core", "effects", "errors", "lr", "metrics", "plan", "testing"}
)
"""Submodules reachable as ``accumfn.<name>`` after ``import accumfn`` alone."""


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _HOME_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'accumfn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps ``accumfn.accumulate`` the function when the submodule of that name loads.

    Python sets a package attribute to each submodule it loads; for a submodule named like
    the public name it defines, the name is bound to what the submodule defines instead.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOME_OF and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
