"""Where committed rows go: a JSONL file (no dependencies) or any callable."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import IO, Protocol, runtime_checkable

__all__ = ["CallableSink", "JsonlSink", "Sink"]


@runtime_checkable
class Sink(Protocol):
    """Receives one row per effective step, in strictly increasing step order."""

    def write(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line: ``{"_step": step, "name": value, ...}``.

    The file is truncated when the sink opens unless ``append=True``. Each row is flushed
    as it is written, so a crash loses at most the step still open in the tracker.
    Non-finite values are written as ``NaN``/``Infinity`` (Python's ``json`` reads them back).
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._file: IO[str] | None = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._file is None:
            raise ValueError(f"JsonlSink({self.path!r}) is closed; rows cannot be written to it.")
        self._file.write(json.dumps({"_step": step, **metrics}) + "\n")
        self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


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
