"""Every optional integration, without its package, says which extra installs it, the same way.

A subprocess hides the packages with an import hook (``import wandb`` raises
ModuleNotFoundError as when it is not installed) and tries each integration. The CI's
minimal install (torch + accumfn, no extras) runs the same checks without hiding anything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HIDE = """
import importlib.abc, sys

HIDDEN = set(sys.argv[1].split(","))

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Hide())
"""

TRY = """
import json, tempfile

def attempt(code):
    try:
        exec(code, {})
    except ImportError as exc:
        return {"type": type(exc).__name__, "message": str(exc),
                "module_not_found": isinstance(exc, ModuleNotFoundError)}
    return None

CASES = {
    "lightning": "from accumfn.lightning_callback import ExactAccumulation",
    "wandb": "from accumfn import MetricsTracker; MetricsTracker(use_wandb=True)",
    "wandb_sink": "from accumfn import WandbSink; WandbSink()",
    "hypothesis": "from accumfn.testing.strategies import accumulation_splits",
    "tensorboard": "from accumfn import TensorBoardSink; TensorBoardSink('tb')",
    "config": "from accumfn import AccumulationConfig; AccumulationConfig.from_yaml('c.yaml')",
}
print("RESULT " + json.dumps({case: attempt(CASES[case]) for case in sys.argv[2].split(",")}))
"""

HINT = re.compile(r"^(?P<feature>.+) needs (?P<package>[\w.]+), which is not installed: "
                  r"pip install 'accumfn\[(?P<extra>\w+)\]'")  # fmt: skip


def run(hidden: list[str], cases: list[str], cwd: Path) -> dict[str, dict[str, object] | None]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    code = textwrap.dedent(HIDE) + textwrap.dedent(TRY)
    done = subprocess.run(
        [sys.executable, "-c", code, ",".join(hidden), ",".join(cases)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result: dict[str, dict[str, object] | None] = json.loads(line.removeprefix("RESULT "))
    return result


def test_each_missing_integration_names_its_extra(tmp_path: Path) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    expected = {
        "lightning": "lightning",
        "wandb": "wandb",
        "wandb_sink": "wandb",
        "hypothesis": "hypothesis",
        "tensorboard": "tensorboard",
        "config": "ruamel.yaml",
    }
    hidden = ["lightning", "wandb", "hypothesis", "tensorboard", "ruamel"]
    result = run(hidden, list(expected), tmp_path)
    for case, package in expected.items():
        error = result[case]
        assert error is not None, f"{case}: no error without {package}"
        assert error["type"] == "MissingDependencyError", error
        assert error["module_not_found"], error
        match = HINT.match(str(error["message"]))
        assert match, f"{case}: {error['message']}"
        assert match["package"] == package
        requirements = extras[match["extra"]]
        assert any(r.startswith(package) for r in requirements), (match["extra"], requirements)
    assert "use_wandb=False" in str(result["wandb"]["message"])  # type: ignore[index]


def test_a_broken_install_is_not_called_missing(tmp_path: Path) -> None:
    # lightning is installed, but a package it imports is not: installing accumfn[lightning]
    # again would not help, so the original error comes through.
    result = run(["lightning_utilities"], ["lightning"], tmp_path)
    error = result["lightning"]
    assert error is not None
    assert error["type"] == "ModuleNotFoundError"
    assert "lightning_utilities" in str(error["message"])
