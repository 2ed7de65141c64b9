"""accumfn: gradient accumulation that is provably the same as large-batch training.

Functional core (``init``, ``accumulate``, ``apply_step``) over an immutable ``AccumState``,
and the ``GradientAccumulator`` object API built on it.

Names are imported on first use, so ``import accumfn`` (and the ``accumfn`` command) does
not import torch until something that needs it is touched.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .accumulator import AccumulationStats, GradientAccumulator
    from .checkpoint import load_checkpoint, save_checkpoint
    from .config import AccumulationConfig
    from .config.lr import scale_lr
    from .core import AccumConfig, AccumState, ByEpoch, ByStep, Constant, Normalization, init
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
    from .integrations import AccumulationConflictError
    from .metrics import (
        CallableSink,
        JsonlSink,
        MetricsStepError,
        MetricsTracker,
        TensorBoardSink,
        WandbSink,
    )
    from .step import (
        StepReport,
        accumulate,
        apply_step,
        check_loss,
        flush,
        micro_step_context,
        prepare_forward,
        reset_epoch,
        step_window,
    )

__version__ = "0.1.0"

_HOMES: dict[str, str] = {
    ".accumulator": "AccumulationStats GradientAccumulator",
    ".checkpoint": "load_checkpoint save_checkpoint",
    ".config": "AccumulationConfig",
    ".config.lr": "scale_lr",
    ".core": "AccumConfig AccumState ByEpoch ByStep Constant Normalization init",
    ".errors": "AccumError CallOrderError CheckpointError CheckpointNotFoundError ConfigError "
    "LossError MissingDependencyError RankMismatchError StateFormatError StepError",
    ".integrations": "AccumulationConflictError",
    ".metrics": "CallableSink JsonlSink MetricsStepError MetricsTracker TensorBoardSink WandbSink",
    ".step": "StepReport accumulate apply_step check_loss flush micro_step_context "
    "prepare_forward reset_epoch step_window",
}
"""Where each public name lives (the same as the imports above, which type checkers read)."""

_HOME_OF = {name: module for module, names in _HOMES.items() for name in names.split()}

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

_MOVED: dict[str, str] = {
    "_accum_buffer": "grads.buffers",
    "_check": "cli._check",
    "_checkpoint": "checkpoint._capture",
    "_dcp": "checkpoint._dcp",
    "_distributed": "parallel._strategy",
    "_foreign_wrappers": "parallel._refused",
    "_grads": "grads._arithmetic",
    "_window": "step._window",
    "accumulate": "step._accumulate",
    "config_plan": "config._advice",
    "demo": "cli.demo",
    "effects": "step._apply",
    "lightning": "integrations._detect",
    "lightning_callback": "integrations.lightning",
    "lr": "config.lr",
    "plan": "config.plan",
}
"""Module paths from before the layers had folders, and the module each one is now.

``import accumfn.effects``, ``from accumfn.lightning_callback import ExactAccumulation`` and
pickles that name an old path load the module that lives at the new path (the same object).
"""


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``accumfn.<old path>`` as the module at its new path (see ``_MOVED``)."""

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.partition(".")
        if package != __name__ or old not in _MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}")
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to run (the module is loaded); give it back the spec of its own path."""
        module.__spec__ = module.__spec__.loader_state if module.__spec__ else None


if not any(isinstance(finder, _Moved) for finder in sys.meta_path):
    sys.meta_path.append(_Moved())


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
