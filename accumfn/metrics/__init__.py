"""Metrics keyed by effective step: ``MetricsTracker`` and its sinks (JSONL, W&B, TensorBoard,
callable).

``wandb`` and ``tensorboard`` are imported only when their sink is made.
"""

from ..errors import MissingDependencyError
from ._values import REDUCTIONS, Reduce
from .sinks import CallableSink, JsonlSink, Sink
from .tensorboard_sink import TensorBoardSink
from .tracker import MetricsStepError, MetricsTracker
from .wandb_sink import WandbSink

__all__ = [
    "REDUCTIONS",
    "CallableSink",
    "JsonlSink",
    "MetricsStepError",
    "MetricsTracker",
    "MissingDependencyError",
    "Reduce",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
]
