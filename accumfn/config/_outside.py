"""Settings written outside the section ``from_yaml`` reads, refused rather than dropped.

With ``section="training"``, ``gradient_accumulation_steps: 4`` at the top level of the file
would be read as the default 1. Every key of the document outside the section is looked at:
accumfn's own field names are refused at the top level, and inside another section too
unless they are names every part of a training config uses for its own settings
(``batch_size`` of a data section, ``learning_rate`` of an optimizer's); another trainer's name for
accumulation or clipping (``OTHER_NAMES``) is refused unless it holds that trainer's no-op
(accumulation 1, clipping None or 0), since that trainer would accumulate or clip as well.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Any

from ..errors import ConfigError
from ._names import OTHER_NAMES, own_name

__all__ = ["refuse_outside"]

_DOES = {"gradient_accumulation_steps": "accumulate", "max_grad_norm": "clip"}
_SHARED = frozenset({"batch_size", "learning_rate"})
"""Names other sections use for their own settings: refused outside only at the top level."""


def refuse_outside(
    document: object, section: str, names: Collection[str], ignore: Collection[str], where: str
) -> None:
    """Raise ConfigError for the first setting of ``document`` outside ``section``."""
    for path, key, value in _keys(document, "", section):
        if path in ignore:
            continue
        place = "at the top level" if "." not in path else f"at {path!r}"
        nested = "." in path or "[" in path
        if (key in names or own_name(key, names)) and not (nested and key in _SHARED):
            raise ConfigError(
                f"{where}: key {key!r} with value {value!r} {place} is outside the {section!r} "
                f"section, which is the one read: it would be dropped and the default used. "
                f"Move it under '{section}:', or pass section= naming the section that holds "
                f"the settings (accumfn check/plan: --section NAME; '' for the whole file); "
                f"if your own code reads it, pass ignore=[{path!r}] (--ignore {path})."
            )
        message = _other_trainer(key, value, place, section)
        if message is not None:
            raise ConfigError(f"{where}: {message}")


def _other_trainer(key: str, value: object, place: str, section: str) -> str | None:
    other = OTHER_NAMES.get(key.lower().replace("-", "_"))
    if other is None or other.generic or other.note or other.field not in _DOES:
        return None
    if other.field == "gradient_accumulation_steps":
        if value in (1, [1]) and not isinstance(value, bool):  # fairseq: update_freq: [1]
            return None
    elif value is None or (value == 0 and not isinstance(value, bool)):
        return None
    does = _DOES[other.field]
    return (
        f"key {key!r} with value {value!r} {place}, outside the {section!r} section, is "
        f"{other.whose}'s name for {other.field}: that trainer would {does} too, on top of "
        f"accumfn. If it is meant for accumfn, write {other.field}: {value!r} under "
        f"'{section}:' and delete it here; if that trainer runs, set it to "
        f"{'1' if does == 'accumulate' else 'null'} so only accumfn does."
    )


def _keys(node: object, path: str, section: str) -> Iterator[tuple[str, str, Any]]:
    """``(dotted path, key, value)`` of every string key under ``node``, the section's
    subtree left out."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            inner = f"{path}.{key}" if path else str(key)
            if inner == section:
                continue
            if isinstance(key, str):
                yield inner, key, value
            yield from _keys(value, inner, section)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _keys(item, f"{path}[{index}]", section)
