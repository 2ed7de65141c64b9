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
    pairs = _pairs(value) if isinstance(value, str) else None
    if isinstance(value, Mapping):
        pairs = list(value.items())
    if pairs is not None:
        return _text(pairs)
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
    pairs = _pairs(value) if isinstance(value, str) else list(value.items())
    return dict(ByEpoch(_epochs(pairs or [])).table)  # checked: never {}


def _pairs(text: str) -> list[tuple[object, object]] | None:
    """The ``(key, value)`` pairs of the mapping ``text`` writes in Python/YAML flow syntax
    (``{0: 2, 3: 4}``), every key kept (a key written twice too), or None."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
        if not isinstance(tree, ast.Dict):
            return None
        return [
            (ast.literal_eval(key) if key is not None else None, ast.literal_eval(steps))
            for key, steps in zip(tree.keys, tree.values, strict=True)
        ]
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _epoch(key: object) -> int:
    """A schedule's key as an epoch: an int, or ASCII digits (JSON objects' keys are always
    text); anything else (``False``, ``0.0``, ``'²'``) is refused."""
    if isinstance(key, str) and key.strip().isascii() and key.strip().isdigit():
        return int(key)
    return check_count("schedule epoch", key, minimum=0)


def _epochs(pairs: list[tuple[object, object]]) -> dict[int, object]:
    """``{epoch: steps}``; two keys that name one epoch (``0`` and ``'0'``) are refused."""
    table: dict[int, object] = {}
    written: dict[int, object] = {}
    for key, steps in pairs:
        epoch = _epoch(key)
        if epoch in table:
            raise ConfigError(
                f"the epoch schedule names epoch {epoch} twice ({written[epoch]!r}: "
                f"{table[epoch]!r} and {key!r}: {steps!r}); keep the one you mean and delete "
                f"the other (never the last kept silently)."
            )
        table[epoch], written[epoch] = steps, key
    return table


def _text(pairs: list[tuple[object, object]]) -> str:
    rows = ByEpoch(_epochs(pairs)).table
    return "{" + ", ".join(f"{epoch}: {steps}" for epoch, steps in rows) + "}"
