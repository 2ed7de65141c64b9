"""The differences the window-step tests measured, printed at the end of the session."""

from __future__ import annotations

import sys
from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    figures = getattr(sys.modules.get("tests.test_window_step"), "FIGURES", None)
    if not figures:
        return
    terminalreporter.section("accumfn window-step figures (largest |accumfn - large batch|)")
    for name, value in sorted(figures.items()):
        terminalreporter.write_line(f"{name}: {value:.3g}")
