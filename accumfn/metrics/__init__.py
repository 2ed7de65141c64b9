"""Metrics keyed by effective step: ``MetricsTracker`` and its sinks (W&B, JSONL, callable).

``wandb`` is imported only when a ``WandbSink`` is made.
"""

from ..errors import MissingDependencyError
from ._values import REDUCTIONS, Reduce
from .sinks import CallableSink, JsonlSink, Sink
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
    "WandbSink",
]
