"""The Weights & Biases sink; ``wandb`` is imported only when one is made."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._optional import raise_missing
from ..errors import MissingDependencyError

__all__ = ["MissingDependencyError", "WandbSink", "import_wandb"]


def import_wandb() -> Any:
    """Import ``wandb`` or say how to install it."""
    try:
        import wandb
    except ImportError as error:
        raise_missing(
            error, "wandb", "wandb", "W&B logging",
            "or pass use_wandb=False to log to a JSONL file instead",
        )  # fmt: skip
    return wandb


class WandbSink:
    """Writes each committed row with ``run.log(metrics, step=step, commit=True)``.

    Uses ``run`` if given; with no arguments, the active ``wandb.run`` if there is one;
    otherwise starts a run with ``wandb.init(**init_kwargs)`` and finishes it on
    ``close()``. Set ``WANDB_MODE=offline`` to log without a network.
    """

    def __init__(self, run: Any = None, **init_kwargs: Any) -> None:
        wandb = import_wandb()
        if run is not None and init_kwargs:
            raise TypeError("pass either run= or wandb.init arguments, not both.")
        self.owns_run = False
        self._finished = False
        if run is None and not init_kwargs:
            run = wandb.run
        if run is None:
            run = wandb.init(**init_kwargs)
            self.owns_run = True
        self.run = run

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step, commit=True)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        if self.owns_run and not self._finished:
            self._finished = True
            self.run.finish()
