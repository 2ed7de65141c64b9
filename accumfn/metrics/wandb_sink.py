"""The Weights & Biases sink; ``wandb`` is imported only when one is made."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping
from typing import Any

from ..errors import MissingDependencyError, raise_missing

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


def _logged_in(wandb: Any) -> bool | None:
    """Whether W&B has credentials, asked without a prompt; None if this wandb cannot say."""
    if "prompt" not in inspect.signature(wandb.login).parameters:
        return None
    return bool(wandb.login(prompt=False, verify=False))


class WandbSink:
    """Writes each committed row with ``run.log(metrics, step=step, commit=True)``.

    Uses ``run`` if given; with no arguments, the active W&B run; otherwise starts a run with
    ``wandb.init(**init_kwargs)`` and finishes it on ``close()``. The run is looked up or
    started by ``start()`` (which ``MetricsTracker`` calls on the ranks that write) or at the
    first row, so a sink on a rank that does not log starts none.

    Without a W&B login (no ``wandb login``, no ``WANDB_API_KEY``) and with no mode chosen
    (``mode=`` or ``WANDB_MODE``), the run it starts logs offline and a warning says where,
    and how to go online. ``WANDB_MODE=offline`` or ``online`` chooses explicitly.
    """

    def __init__(self, run: Any = None, **init_kwargs: Any) -> None:
        self._wandb = import_wandb()
        if run is not None and init_kwargs:
            raise TypeError("pass either run= or wandb.init arguments, not both.")
        self._run = run
        self._init_kwargs = init_kwargs
        self._config: dict[str, Any] = {}
        self.owns_run = False
        self._finished = False

    def record_config(self, values: Mapping[str, Any]) -> None:
        """Add ``values`` to the config of the run this sink starts (not of one it was given)."""
        self._config.update(values)

    @property
    def run(self) -> Any:
        """The W&B run rows go to; starting it here if the sink starts its own."""
        if self._run is None:
            if not self._init_kwargs:
                self._run = self._wandb.run
            if self._run is None:
                self._run = self._start()
                self.owns_run = True
        return self._run

    def _start(self) -> Any:
        kwargs = dict(self._init_kwargs)
        chosen = "mode" in kwargs or os.environ.get("WANDB_MODE")
        offline = not chosen and _logged_in(self._wandb) is False
        if offline:
            kwargs["mode"] = "offline"
        run = self._wandb.init(**kwargs)
        if self._config:
            run.config.update(self._config)
        if offline:
            where = os.path.dirname(run.dir)
            warnings.warn(
                f"W&B has no login here, so this run logs offline to {where}. To log online, "
                f"run `wandb login` once (or set WANDB_API_KEY); to upload this run, "
                f"`wandb sync {where}`. Set WANDB_MODE=offline to choose offline and skip this "
                f"warning.",
                stacklevel=2,
            )
        return run

    def start(self) -> None:
        """Start (or find) the run now rather than at the first row."""
        self.run  # noqa: B018

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step, commit=True)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        if self.owns_run and not self._finished:
            self._finished = True
            self.run.finish()
