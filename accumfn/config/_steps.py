"""``gradient_accumulation_steps`` as a config holds it: an int, or an epoch schedule as text.

Every config stack can carry an ``int | str`` field (argparse gives one type per argument,
OmegaConf refuses unions of containers), so an epoch schedule is kept as its text,
``"{0: 2, 3: 4}"``; ``{0: 2, 3: 4}`` as a mapping (YAML, JSON, a dict) is accepted too and
written as that text. ``schedule`` turns it back into what ``accumfn.init(steps=...)`` takes.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping

from ..core import ByEpoch, Constant, check_count
from ..errors import ConfigError

__all__ = ["schedule", "steps_value"]

_FORMS = "an int >= 1, or an epoch schedule {epoch: steps} such as {0: 2, 3: 4}"


def steps_value(value: object) -> int | str:
    """``value`` checked: the int, or the schedule's text with its epochs in order."""
    if value is None:
        raise ConfigError(
            "gradient_accumulation_steps: null (windows the training loop closes itself) "
            "cannot come from a config: whether a loop closes its windows is part of its code, "
            "which must pass is_final_batch=True on each window's last micro-batch; a config "
            "that said so to a loop that does not would never step. Pass "
            "accumulation_steps=None to GradientAccumulator (or accumfn.init(steps=None)) in "
            "that loop, and leave gradient_accumulation_steps out of the config."
        )
    table = _mapping(value) if isinstance(value, str) else value
    if isinstance(table, Mapping):
        return _text(table)
    if callable(value) or isinstance(value, (Constant, ByEpoch)):
        raise ConfigError(
            f"gradient_accumulation_steps must be {_FORMS} in a config, got {value!r}; a "
            f"callable schedule cannot be written in a config file: pass it to "
            f"accumfn.init(steps=...) or GradientAccumulator(...) directly."
        )
    return check_count("gradient_accumulation_steps", value)


def schedule(value: int | str | Mapping[object, object]) -> int | dict[int, int]:
    """What ``accumfn.init(steps=...)`` takes for a checked ``value``."""
    if isinstance(value, int):
        return value
    table = _mapping(value) if isinstance(value, str) else value
    return dict(ByEpoch(_int_keys(table or {})).table)  # checked: never {}


def _mapping(text: str) -> Mapping[object, object] | None:
    """The mapping ``text`` writes in Python/YAML flow syntax (``{0: 2, 3: 4}``), or None."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, Mapping) else None


def _int_keys(table: Mapping[object, object]) -> dict[object, object]:
    """Epochs written as text (JSON objects' keys are always text) read as ints."""
    return {
        int(key) if isinstance(key, str) and key.strip().isdigit() else key: steps
        for key, steps in table.items()
    }


def _text(table: Mapping[object, object]) -> str:
    rows = ByEpoch(_int_keys(table)).table
    return "{" + ", ".join(f"{epoch}: {steps}" for epoch, steps in rows) + "}"
