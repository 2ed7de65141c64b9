"""The documentation's code runs under pytest, through Sybil.

Every ```python block of README.md and docs/**/*.md is executed, the blocks of one page in
order and in one namespace, as if pasted into one script (``__name__ == "__main__"``). A
block that cannot run here (it needs torchrun, a GPU, a W&B login or a long run) is preceded
by ``<!-- skip: next -->`` and a sentence linking the runnable example in examples/.

A ```yaml block whose first line is a comment naming a file (``# config.yaml``) is written
to that file, so that the page's Python reads what the page shows.

Each page runs in a temporary directory of its own (what its blocks write goes there and is
removed afterwards), with W&B offline unless ``WANDB_MODE`` says otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sybil import Example, Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

NAMED_FILE = re.compile(r"#\s*(?P<name>[\w.-]+\.ya?ml)\s*$")
ENVIRONMENT = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _write_named_file(example: Example) -> None:
    """Write a YAML block to the file its first line names; other YAML blocks are shown only."""
    text = str(example.parsed)
    named = NAMED_FILE.match(text.split("\n", 1)[0])
    if named is not None:
        Path(named["name"]).write_text(text, encoding="utf-8")


_pages: dict[int, tuple[str, str, dict[str, str | None]]] = {}


def _enter_page(namespace: dict[str, Any]) -> None:
    directory = tempfile.mkdtemp(prefix="accumfn-docs-")
    changed = {key: value for key, value in ENVIRONMENT.items() if key not in os.environ}
    changed["WANDB_DIR"] = directory
    _pages[id(namespace)] = (os.getcwd(), directory, {k: os.environ.get(k) for k in changed})
    os.environ.update(changed)
    os.chdir(directory)
    namespace["__name__"] = "__main__"


def _leave_page(namespace: dict[str, Any]) -> None:
    cwd, directory, saved = _pages.pop(id(namespace))
    os.chdir(cwd)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(directory, ignore_errors=True)


pytest_collect_file = Sybil(
    parsers=[
        PythonCodeBlockParser(),
        CodeBlockParser(language="yaml", evaluator=_write_named_file),
        SkipParser(),
    ],
    patterns=["*.md"],
    setup=_enter_page,
    teardown=_leave_page,
).pytest()
