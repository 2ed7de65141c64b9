"""The TensorBoard sink: torch's ``SummaryWriter``; ``tensorboard`` is needed only to make one."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import raise_missing

__all__ = ["TensorBoardSink"]


def _summary_writer() -> Any:
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
    except ImportError as error:
        raise_missing(error, "tensorboard", "tensorboard", "TensorBoard logging")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


class TensorBoardSink:
    """Writes each committed row as scalars at ``global_step=step`` into ``log_dir``.

    ``log_dir=None`` uses ``SummaryWriter``'s default (``runs/<date>_<host>``); other
    keyword arguments go to ``SummaryWriter``. The writer, and with it the event file, is
    made by ``start()`` (which ``MetricsTracker`` calls on the ranks that write) or at the
    first row, so a sink on a rank that does not log leaves nothing behind. View the run with
    ``tensorboard --logdir <log_dir>``.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | None = None, **writer_kwargs: Any) -> None:
        self._writer_class = _summary_writer()
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._writer_kwargs = writer_kwargs
        self._writer: Any = None
        self._closed = False

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` (made on first use)."""
        if self._closed:
            raise ValueError(f"TensorBoardSink({self.log_dir!r}) is closed.")
        if self._writer is None:
            self._writer = self._writer_class(log_dir=self.log_dir, **self._writer_kwargs)
        return self._writer

    def start(self) -> None:
        """Make the writer (and its event file) now rather than at the first row."""
        self.writer  # noqa: B018

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        self._closed = True
