"""Without wandb installed: use_wandb=True says how to install it; everything else works.

A subprocess hides wandb with an import hook (``import wandb`` raises ModuleNotFoundError as
when it is not installed), then trains with JSONL and callable sinks, checks the errors, and
runs the test modules that do not need W&B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HIDE_WANDB = """
import importlib.abc, sys

class NoWandb(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoWandb())
for name in [n for n in sys.modules if n == "wandb" or n.startswith("wandb.")]:
    del sys.modules[name]
"""

SCRIPT = """
import json, os, tempfile
import pytest, torch
from torch import nn
try:
    import wandb
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("wandb is still importable")

import accumfn
from accumfn import (
    CallableSink, GradientAccumulator, JsonlSink, MetricsTracker, MissingDependencyError,
    WandbSink,
)

errors = []
for make in (lambda: MetricsTracker(use_wandb=True), lambda: WandbSink()):
    try:
        make()
    except MissingDependencyError as exc:
        errors.append([isinstance(exc, ImportError), str(exc)])

folder = tempfile.mkdtemp()
rows = []
torch.manual_seed(0)
model = nn.Linear(3, 1)
accumulator = GradientAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), 4)
tracker = MetricsTracker(
    sinks=[JsonlSink(os.path.join(folder, "m.jsonl")), CallableSink(lambda s, m: rows.append(s))]
)
with tracker, MetricsTracker(jsonl_path=os.path.join(folder, "default.jsonl")) as default:
    for index in range(10):
        step = accumulator.effective_step
        loss = model(torch.randn(2, 3)).pow(2).mean()
        tracker.log_scalar("loss", loss.detach(), step=step)
        default.log_scalar("loss", loss.detach(), step=step)
        accumulator.accumulate(loss, model, is_final_batch=index == 9)
lines = [json.loads(line) for line in open(os.path.join(folder, "m.jsonl"))]
default_lines = [json.loads(line) for line in open(os.path.join(folder, "default.jsonl"))]

suite = pytest.main(
    ["-q", "-p", "no:cacheprovider", "-k", "not wandb",
     "tests/test_core.py", "tests/test_functional.py", "tests/test_metrics.py"]
)
print("RESULT " + json.dumps({
    "errors": errors,
    "steps": [line["_step"] for line in lines],
    "default_steps": [line["_step"] for line in default_lines],
    "callable_steps": rows,
    "effective_step": accumulator.effective_step,
    "suite": int(suite),
}))
"""


def test_without_wandb_use_wandb_says_how_to_install_and_the_rest_works() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WANDB_MODE", None)
    code = textwrap.dedent(HIDE_WANDB) + textwrap.dedent(SCRIPT)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert len(result["errors"]) == 2
    for is_import_error, message in result["errors"]:
        assert is_import_error
        assert "pip install 'accumfn[wandb]'" in message and "use_wandb=False" in message
    assert result["effective_step"] == 3
    assert result["steps"] == result["default_steps"] == result["callable_steps"] == [0, 1, 2]
    assert result["suite"] == 0, done.stdout[-3000:]
