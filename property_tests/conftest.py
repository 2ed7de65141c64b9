"""Figures the property runs report at the end of the session (largest differences seen)."""

from __future__ import annotations

from typing import Any

import pytest

FIGURES: dict[str, dict[str, Any]] = {}


def record(name: str, diff: float, quantity: str = "|param - large-batch param|") -> None:
    """Count one example of property ``name`` and keep the largest ``quantity`` difference."""
    entry = FIGURES.setdefault(name, {"examples": 0, "max_abs_diff": 0.0, "quantity": quantity})
    entry["examples"] += 1
    entry["max_abs_diff"] = max(entry["max_abs_diff"], diff)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("accumfn equivalence figures")
    for name, entry in sorted(FIGURES.items()):
        terminalreporter.write_line(
            f"{name}: {int(entry['examples'])} examples, "
            f"largest {entry['quantity']} = "
            f"{entry['max_abs_diff']:.3g}"
        )


@pytest.fixture
def figures() -> dict[str, dict[str, Any]]:
    return FIGURES
