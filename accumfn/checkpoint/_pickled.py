"""A ``GradientAccumulator`` pickled whole: with what its open window keeps on the device
beside the state, and loadable from pickles of earlier versions."""

from __future__ import annotations

from typing import Any

from ..core import AccumState
from ..step import attach_beside, tally_beside

__all__ = ["pickled", "unpickled"]

_OLD_NAMES = {
    **{f"_{name}": name for name in ("optimizer", "scaler", "scheduler", "before_step")},
    "_clip_value": "clip_value",
    "_settled": "",
    "_checked_model": "",
    "_warned_model": "",
}
"""Attributes of pickles from earlier versions: the name each is kept under now ("": none)."""

_ADDED = {"_warned": None, "_watched": None, "_window_loss": None}
"""Attributes added since the first version, with the value an older pickle stands for."""


def pickled(attributes: dict[str, Any], state: AccumState) -> dict[str, Any]:
    """The accumulator's attributes, with what its window keeps beside ``state``."""
    saved = dict(attributes)
    beside = tally_beside(state)
    if beside is not None:
        saved["_beside"] = beside
    return saved


def unpickled(saved: dict[str, Any]) -> dict[str, Any]:
    """The attributes to set from a pickle of any version (what the window kept beside the
    state put back beside it)."""
    attributes: dict[str, Any] = dict(_ADDED)
    for name, value in saved.items():
        name = _OLD_NAMES.get(name, name)
        if name and name != "_beside":
            attributes[name] = value
    if saved.get("_beside") is not None:
        attach_beside(attributes["_state"], saved["_beside"])
    return attributes
