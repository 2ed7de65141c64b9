"""Checks a minimal install (torch + accumfn, no extras), run from outside the repository.

Importing accumfn and torch prints nothing; the command answers without importing torch;
every optional integration says which extra installs it; the wheel ships the LICENSE.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import accumfn

assert "site-packages" in (accumfn.__file__ or ""), f"not the installed copy: {accumfn.__file__}"


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


done = run("import accumfn; accumfn.GradientAccumulator; import torch; torch.zeros(1).numpy()")
assert done.returncode == 0 and done.stderr == "", f"import printed:\n{done.stderr}"

done = run(
    "import sys; from accumfn.cli import main; main(['plan', '--batch-size', '8', '--target', "
    "'256']); assert 'torch' not in sys.modules"
)
assert done.returncode == 0 and "accumulation steps (window)    32" in done.stdout, done

integrations = {
    "lightning": "from accumfn.lightning_callback import ExactAccumulation",
    "wandb": "from accumfn import MetricsTracker; MetricsTracker(use_wandb=True)",
    "testing": "import accumfn.testing.strategies",
    "tensorboard": "from accumfn import TensorBoardSink; TensorBoardSink('tb')",
    "config": "from accumfn import AccumulationConfig; AccumulationConfig.from_yaml('c.yaml')",
}
for extra, code in integrations.items():
    done = run(code)
    hint = f"pip install 'accumfn[{extra}]'"
    assert done.returncode == 1 and "MissingDependencyError" in done.stderr, done.stderr
    assert hint in done.stderr, f"{extra}: no {hint!r} in\n{done.stderr}"

files = [str(f) for f in importlib.metadata.files("accumfn") or []]
assert any(f.endswith("licenses/LICENSE") for f in files), files
print("minimal install: silent import, light command, install hints, LICENSE: ok")
