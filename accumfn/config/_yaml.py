"""A YAML config file read as YAML 1.2 says, with ruamel.yaml (``pip install 'accumfn[config]'``).

- integers are YAML 1.2's: ``010`` is 10, ``0o10`` is 8, and ``1:30`` is text (YAML 1.1
  readers such as PyYAML read 8 and 90);
- ``true``/``false`` are booleans, ``yes``/``on`` are text; ``3e-4`` is a number;
- a key written twice in one mapping is an error naming both lines (never the last kept);
- plain data only (ruamel's safe loader): a tag that would build a Python object is an error.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, raise_missing

__all__ = ["read_yaml"]


def _ruamel() -> Any:
    try:
        import ruamel.yaml
    except ImportError as error:
        raise_missing(
            error,
            "ruamel.yaml",
            "config",
            "reading a YAML config",
            otherwise="or load the file yourself and pass the dict to "
            "AccumulationConfig.from_mapping",
        )
    return ruamel.yaml


def read_yaml(path: Path) -> Any:
    """The data of the YAML file at ``path`` (a ConfigError says what is wrong with it)."""
    ruamel = _ruamel()
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        where = "" if path.is_absolute() else f"; the current directory is {os.getcwd()!r}"
        raise ConfigError(
            f"no config file at {str(path)!r} (it {state}{where}): check the path, e.g. "
            f"examples/config.yaml."
        )
    text = _text(path)
    yaml = ruamel.YAML(typ="safe", pure=True)
    yaml.allow_duplicate_keys = False
    try:
        data = yaml.load(text)
    except ruamel.constructor.DuplicateKeyError as exc:
        raise ConfigError(_duplicate_message(path, yaml.compose(text), exc)) from None
    except ruamel.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(
            f"{str(path)!r} is not valid YAML{line}: {problem}; fix the file (indent nested "
            f"keys with spaces, one 'key: value' per line)."
        ) from None
    except Exception as exc:  # ruamel's own assertions, e.g. a key twice in an !!omap
        raise ConfigError(
            f"{str(path)!r} could not be read as YAML (ruamel.yaml raised "
            f"{type(exc).__name__}{f': {exc}' if str(exc) else ''}); write the settings as "
            f"plain 'key: value' lines, each key once, without tags such as !!omap."
        ) from None
    if data is None:
        raise ConfigError(
            f"{str(path)!r} is empty; write the settings in it, e.g. 'training:' then "
            f"'  batch_size: 8' and '  gradient_accumulation_steps: 4'."
        )
    return data


def _text(path: Path) -> str:
    """The file's text, which must be UTF-8 (a ConfigError names the file otherwise)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        wide = data[:2] in (b"\xff\xfe", b"\xfe\xff")  # a UTF-16 or UTF-32 byte-order mark
        kind = "UTF-16 or UTF-32 text, not UTF-8" if wide else "not UTF-8"
        raise ConfigError(
            f"{str(path)!r} is {kind} (byte {data[exc.start]:#04x} at offset {exc.start} "
            f"cannot be read as UTF-8); save it as UTF-8, the encoding accumfn, Hydra and the "
            f"other config readers read."
        ) from None


def _duplicate_message(path: Path, root: Any, exc: Exception) -> str:
    found = next(_duplicates(root, ""), None)
    if found is None:  # not found again: ruamel's own account
        return f"{str(path)!r} writes a key twice: {exc}"
    key, first, second = found
    return (
        f"{str(path)!r}: key {key!r} is written twice, at line {first} and line {second}; "
        f"keep the one you mean and delete the other (a YAML mapping holds each key once; "
        f"readers that allow it keep the last silently)."
    )


def _duplicates(node: Any, path: str) -> Iterator[tuple[str, int, int]]:
    """``(dotted key, first line, second line)`` of each key written twice under ``node``."""
    if node.id == "mapping":
        seen: dict[object, int] = {}
        for key, value in node.value:
            name = f"{path}.{key.value}" if path else str(key.value)
            if key.id == "scalar":
                line = key.start_mark.line + 1
                if key.value in seen:
                    yield name, seen[key.value], line
                seen.setdefault(key.value, line)
            yield from _duplicates(value, name)
    elif node.id == "sequence":
        for index, item in enumerate(node.value):
            yield from _duplicates(item, f"{path}[{index}]")
