"""accumfn: gradient accumulation that is provably the same as large-batch training.

Functional core (``init``, ``accumulate``, ``apply_step``) over an immutable ``AccumState``,
and the ``GradientAccumulator`` object API built on it.
"""

from .accumulate import accumulate, check_loss, micro_step_context, prepare_forward
from .accumulator import AccumulationStats, GradientAccumulator
from .checkpoint import load_checkpoint, save_checkpoint
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
    StateFormatError,
)
from .lightning import AccumulationConflictError
from .metrics import (
    CallableSink,
    JsonlSink,
    MetricsStepError,
    MetricsTracker,
    TensorBoardSink,
    WandbSink,
)

__version__ = "0.1.0"

__all__ = [
    "AccumConfig",
    "AccumError",
    "AccumState",
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
    "StateFormatError",
    "StepReport",
    "TensorBoardSink",
    "WandbSink",
    "__version__",
    "accumulate",
    "apply_step",
    "check_loss",
    "init",
    "load_checkpoint",
    "micro_step_context",
    "prepare_forward",
    "reset_epoch",
    "save_checkpoint",
    "step_window",
]
