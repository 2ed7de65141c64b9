"""``MetricsTracker``: merges what is logged within one effective step into one row."""

from __future__ import annotations

import atexit
import numbers
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..core import check_count
from ..errors import AccumError, CallOrderError, ConfigError
from ._values import Reduce, ScalarBuffer, Value, check_reduce, check_value, materialize
from .sinks import JsonlSink, Sink
from .wandb_sink import WandbSink

if TYPE_CHECKING:
    from ..accumulator import GradientAccumulator
    from ..step import StepReport

__all__ = ["MetricsStepError", "MetricsTracker"]

DEFAULT_JSONL = "metrics.jsonl"


class MetricsStepError(AccumError, ValueError):
    """A metric was logged at a step that has already been written."""


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or int(step) < 0:
        raise ConfigError(
            f"step must be an int >= 0 (use accumulator.effective_step), got {step!r}."
        )
    return int(step)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a metric name must be a non-empty str, got {name!r}.")
    if name.startswith("_"):
        raise ConfigError(
            f"metric name {name!r} starts with '_', which W&B reserves (_step, _runtime); "
            f"rename it."
        )
    return name


def _planned_steps(steps: object) -> int | None:
    if steps is None:
        return None
    try:
        return check_count("gradient_accumulation_steps", steps)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc} Pass the accumulator's planned window, or None when the caller closes "
            f"windows (accumulation_steps=None)."
        ) from None


class MetricsTracker:
    """Log scalars keyed by effective (optimizer) step; each step is written once.

    Everything logged at one step is merged into one row, committed to every sink when a
    larger step is logged, on ``flush()`` and on ``close()`` (also at interpreter exit).
    A metric logged several times in one step (a per-micro-batch loss) is reduced with
    ``reduce`` (``"mean"``, ``"sum"`` or ``"last"``; per name with ``reduce_by_name``).
    Tensor values stay on their device until the row is committed.

    Steps written strictly increase. Logging at a step already written raises
    ``MetricsStepError``; with ``on_stale_step="warn"`` the value is dropped with a warning.

    Sinks: ``sinks`` if given, else a ``JsonlSink(jsonl_path)`` unless ``use_wandb``;
    ``use_wandb=True`` adds a ``WandbSink(**wandb_init)`` (the active W&B run if there is one
    and ``wandb_init`` is empty). ``gradient_accumulation_steps`` is recorded in the config
    of a W&B run the tracker starts (None: windows the caller closes, ``steps=None``, with
    no planned size); rows follow the step you pass, so short final windows, accumulation
    schedules and windows of any size commit correctly.

    Distributed runs: by default only global rank 0 writes, as Lightning's loggers do. The
    other ranks check every value and step the same way (an error is raised on every rank
    alike) and drop the rows; their sinks open no file and start no run. With
    ``per_rank=True`` every rank writes to its own sinks, and the default JSONL file is
    ``metrics.rank<r>.jsonl``; give sinks you pass a path of their own on each rank. The rank
    is that of the initialized default process group, else the ``RANK`` variable that
    ``torchrun`` sets, else 0.
    """

    def __init__(
        self,
        use_wandb: bool = False,
        gradient_accumulation_steps: int | None = 1,
        sinks: Iterable[Sink] | None = None,
        *,
        reduce: Reduce = "mean",
        reduce_by_name: Mapping[str, Reduce] | None = None,
        on_stale_step: Literal["raise", "warn"] = "raise",
        jsonl_path: str | os.PathLike[str] = DEFAULT_JSONL,
        wandb_init: Mapping[str, Any] | None = None,
        per_rank: bool = False,
    ) -> None:
        if not isinstance(use_wandb, bool):
            raise ConfigError(f"use_wandb must be True or False, got {use_wandb!r}.")
        if not isinstance(per_rank, bool):
            raise ConfigError(f"per_rank must be True or False, got {per_rank!r}.")
        self.rank = global_rank()
        self.writes = per_rank or self.rank == 0
        """Whether this rank writes rows to its sinks."""
        self.gradient_accumulation_steps = _planned_steps(gradient_accumulation_steps)
        """The planned window recorded in a W&B run's config; None when the caller closes
        windows (``steps=None``)."""
        self.reduce = check_reduce("reduce", reduce)
        self.reduce_by_name = {
            _check_name(name): check_reduce(f"reduce_by_name[{name!r}]", how)
            for name, how in (reduce_by_name or {}).items()
        }
        if on_stale_step not in ("raise", "warn"):
            raise ConfigError(f"on_stale_step must be 'raise' or 'warn', got {on_stale_step!r}.")
        self.on_stale_step = on_stale_step
        chosen = list(sinks) if sinks is not None else []
        for sink in chosen:
            if not isinstance(sink, Sink):
                raise ConfigError(
                    f"sink {sink!r} lacks write(step, metrics)/flush()/close(); use "
                    f"CallableSink(fn) to wrap a function."
                )
        if use_wandb:
            wandb_sink = WandbSink(**(wandb_init or {}))
            wandb_sink.record_config(
                {"gradient_accumulation_steps": self.gradient_accumulation_steps}
            )
            chosen.append(wandb_sink)
        elif sinks is None:
            chosen.append(JsonlSink(rank_path(jsonl_path, self.rank) if per_rank else jsonl_path))
        self.sinks: tuple[Sink, ...] = tuple(chosen)
        if self.writes:
            for sink in self.sinks:
                start = getattr(sink, "start", None)
                if callable(start):
                    start()
        self._step: int | None = None
        self._last_written: int | None = None
        self._row: dict[str, ScalarBuffer] = {}
        self._window_logged: dict[str, int] = {}
        """The last window step ``log_window_loss`` logged, per name."""
        self._closed = False
        self._at_exit = _close_at_exit(weakref.ref(self))
        atexit.register(self._at_exit)

    # -- logging ------------------------------------------------------------------------------
    def log_scalar(self, name: str, value: Value, step: int) -> None:
        """Add ``value`` to metric ``name`` at effective step ``step``."""
        checked_name, checked_step = _check_name(name), _check_step(step)
        self._log(checked_name, check_value(checked_name, value), checked_step)

    def log(self, metrics: Mapping[str, Value], step: int) -> None:
        """``log_scalar`` for each item of ``metrics``; all checked before any is added."""
        at = _check_step(step)
        checked = [(_check_name(name), value) for name, value in metrics.items()]
        values = [(name, check_value(name, value)) for name, value in checked]
        for name, value in values:
            self._log(name, value, at)

    def log_window_loss(self, source: GradientAccumulator | StepReport, name: str = "loss") -> None:
        """Log the loss of the window ``source`` stepped last (a ``GradientAccumulator``,
        or the ``StepReport`` of ``step_window``) at that window's effective step: the
        loss the large batch would have (``StepReport.window_loss``), over all ranks.

        It stays on the device until its row is written (one read per row, with the row's
        other tensors); nothing is read on steps that do not log. Call it once a window
        has closed (``accumulate`` returned True), before logging at the next step; a
        window already logged by this method, or none closed yet, logs nothing.
        """
        from ..accumulator import GradientAccumulator
        from ..step import StepReport

        if isinstance(source, StepReport):
            loss, step = source.window_loss, source.state.effective_step - 1
        elif isinstance(source, GradientAccumulator):
            loss, step = source.window_loss, source.effective_step - 1
        else:
            raise ConfigError(
                f"log_window_loss takes a GradientAccumulator or the StepReport that "
                f"step_window returned, got {type(source).__name__}."
            )
        checked_name = _check_name(name)
        if loss is None or step < 0 or self._window_logged.get(checked_name) == step:
            return
        self._log(checked_name, check_value(checked_name, loss), step)
        self._window_logged[checked_name] = step

    def _log(self, name: str, value: float | torch.Tensor, step: int) -> None:
        if self._closed:
            raise CallOrderError("this MetricsTracker is closed; make a new one to log more.")
        if self._step is None or step > self._step:
            if self._last_written is not None and step <= self._last_written:
                self._stale(name, step)
                return
            self._commit()
            self._step = step
        elif step < self._step:
            self._stale(name, step)
            return
        buffer = self._row.get(name)
        if buffer is None:
            buffer = self._row[name] = ScalarBuffer(self.reduce_by_name.get(name, self.reduce))
        buffer.add(value)

    def _stale(self, name: str, step: int) -> None:
        latest = self._step if self._step is not None else self._last_written
        message = (
            f"metric {name!r} logged at step {step}, but step {latest} was already logged "
            f"and steps must strictly increase; log at accumulator.effective_step and do not "
            f"log at a step after flush() has written it."
        )
        if self.on_stale_step == "raise":
            raise MetricsStepError(message)
        warnings.warn(message + " The value was dropped.", stacklevel=4)

    # -- committing ---------------------------------------------------------------------------
    def _commit(self) -> None:
        if self._step is None or not self._row:
            return
        step, row = self._step, self._row
        self._row = {}
        self._step = None
        self._last_written = step
        if not self.writes:
            return
        values = materialize({name: buffer.result() for name, buffer in row.items()})
        for sink in self.sinks:
            sink.write(step, values)

    @property
    def step(self) -> int | None:
        """The step open for logging (None when nothing is pending)."""
        return self._step

    @property
    def last_written_step(self) -> int | None:
        """The last step committed to the sinks."""
        return self._last_written

    def flush(self) -> None:
        """Commit the open step now and flush the sinks."""
        self._commit()
        if self.writes:
            for sink in self.sinks:
                sink.flush()

    def close(self) -> None:
        """Flush, then close every sink (finishes a W&B run this tracker started). Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            atexit.unregister(self._at_exit)
            for sink in self.sinks:
                sink.close()

    def __enter__(self) -> MetricsTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def global_rank() -> int:
    """The rank in the default process group if there is one, else ``RANK``, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    rank = os.environ.get("RANK", "0")
    if not rank.isdigit():
        raise ConfigError(f"the RANK environment variable must be a whole number, got {rank!r}.")
    return int(rank)


def rank_path(path: str | os.PathLike[str], rank: int) -> str:
    """``metrics.jsonl`` -> ``metrics.rank<rank>.jsonl``."""
    root, extension = os.path.splitext(os.fspath(path))
    return f"{root}.rank{rank}{extension}"


def _close_at_exit(ref: weakref.ref[MetricsTracker]) -> Callable[[], None]:
    def close() -> None:
        tracker = ref()
        if tracker is not None:
            tracker.close()

    return close
