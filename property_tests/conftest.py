"""Figures the property runs report at the end of the session (largest differences seen)."""

from __future__ import annotations

from typing import Any

import pytest

FIGURES: dict[str, dict[str, float]] = {}


def record(name: str, diff: float) -> None:
    """Count one example of property ``name`` and keep the largest difference seen."""
    entry = FIGURES.setdefault(name, {"examples": 0, "max_abs_diff": 0.0})
    entry["examples"] += 1
    entry["max_abs_diff"] = max(entry["max_abs_diff"], diff)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("accumfn equivalence figures")
    for name, entry in sorted(FIGURES.items()):
        terminalreporter.write_line(
            f"{name}: {int(entry['examples'])} examples, "
            f"largest |param - large-batch param| = {entry['max_abs_diff']:.3g}"
        )


@pytest.fixture
def figures() -> dict[str, dict[str, float]]:
    return FIGURES
