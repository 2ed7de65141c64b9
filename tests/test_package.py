"""The package's public names: imported on first use, the same everywhere they are listed."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import accumfn

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_are_listed_once_everywhere() -> None:
    homes = accumfn._HOMES
    names = [name for group in homes.values() for name in group.split()]
    assert len(names) == len(set(names))
    assert set(accumfn.__all__) == {*names, "__version__"}
    # The imports type checkers read (under TYPE_CHECKING) name the same homes.
    tree = ast.parse((ROOT / "accumfn" / "__init__.py").read_text())
    checking = next(
        node for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node)
    )
    imported = {
        "." + node.module: tuple(alias.name for alias in node.names)
        for node in checking.body
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported == {module: tuple(names.split()) for module, names in homes.items()}


def test_every_public_name_resolves_to_its_home() -> None:
    for module, names in accumfn._HOMES.items():
        home = sys.modules.get(f"accumfn{module}") or __import__(f"accumfn{module}", fromlist=["x"])
        for name in names.split():
            assert getattr(accumfn, name) is getattr(home, name), name
    assert callable(accumfn.accumulate)  # the function, not the module of the same name


def test_import_is_light_and_the_first_use_loads_torch_without_warnings() -> None:
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "import accumfn\n"
        "light = 'torch' not in sys.modules\n"
        "accumfn.GradientAccumulator, accumfn.accumulate\n"
        "print(light, 'torch' in sys.modules, callable(accumfn.accumulate))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"]
    assert done.stderr == ""


def test_public_submodules_are_reachable_after_import_accumfn_alone() -> None:
    """``import accumfn; accumfn.checkpoint.save_checkpoint(...)`` works without more imports."""
    code = (
        "import accumfn\n"
        "for name in ('checkpoint', 'core', 'metrics', 'testing', 'config', 'lr', 'errors'):\n"
        "    assert hasattr(accumfn, name), name\n"
        "assert callable(accumfn.checkpoint.distributed_state)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
