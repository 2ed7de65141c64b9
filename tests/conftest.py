"""The differences the window-step tests measured, printed at the end of the session; the
config dataclass's fields as defined at the start of every test."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import pytest

from accumfn import AccumulationConfig


@pytest.fixture(autouse=True)
def _config_fields_as_defined() -> None:
    """transformers' HfArgumentParser writes the type it picks into each ``dataclasses.Field``
    of the class it reads (``int`` for ``int | str``), and pydantic reads that type: every
    test starts from AccumulationConfig as defined, whatever ran before it (docs/config.md's
    HfArgumentParser block too)."""
    for field in dataclasses.fields(AccumulationConfig):
        field.type = AccumulationConfig.__annotations__[field.name]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    figures = getattr(sys.modules.get("tests.test_window_step"), "FIGURES", None)
    if not figures:
        return
    terminalreporter.section("accumfn window-step figures (largest |accumfn - large batch|)")
    for name, value in sorted(figures.items()):
        terminalreporter.write_line(f"{name}: {value:.3g}")
