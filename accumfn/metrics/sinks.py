"""Where committed rows go: a JSONL file (no dependencies) or any callable."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import IO, Protocol, runtime_checkable

__all__ = ["CallableSink", "JsonlSink", "Sink"]


@runtime_checkable
class Sink(Protocol):
    """Receives one row per effective step, in strictly increasing step order.

    A sink may also have ``start()``: the tracker calls it when it is made, on the ranks that
    write, so files open and runs start there and nowhere else.
    """

    def write(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line: ``{"_step": step, "name": value, ...}``.

    The file is opened, and truncated unless ``append=True``, by ``start()`` (which
    ``MetricsTracker`` calls on the ranks that write) or at the first row: a sink on a rank
    that does not log leaves any file there untouched.
    Each row is flushed as it is written, so a crash loses at most the step still open in
    the tracker. Non-finite values are written as ``NaN``/``Infinity`` (Python's ``json``
    reads them back).
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        self.path = os.fspath(path)
        self.append = append
        self._file: IO[str] | None = None
        self._closed = False

    def _open(self) -> IO[str]:
        if self._closed:
            raise ValueError(f"JsonlSink({self.path!r}) is closed; rows cannot be written to it.")
        if self._file is None:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")  # noqa: SIM115
        return self._file

    def start(self) -> None:
        """Open (create or truncate) the file now rather than at the first row."""
        self._open()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        file = self._open()
        file.write(json.dumps({"_step": step, **metrics}) + "\n")
        file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._closed = True


class CallableSink:
    """Calls ``fn(step, metrics)`` for every committed row (e.g. ``rows.append`` via a lambda)."""

    def __init__(self, fn: Callable[[int, dict[str, float]], object]) -> None:
        if not callable(fn):
            raise TypeError(f"CallableSink needs a callable fn(step, metrics), got {fn!r}.")
        self.fn = fn

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self.fn(step, dict(metrics))

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None
