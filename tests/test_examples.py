"""Every script in examples/ runs to the end at its small default size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ._dist_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))
DISTRIBUTED = {"ddp.py", "ddp_checkpoint.py"}


def _command(name: str) -> list[str]:
    script = str(ROOT / "examples" / name)
    if name in DISTRIBUTED:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            script,
        ]
    return [sys.executable, script]


def test_every_example_is_listed() -> None:
    assert {"manual_loop.py", "amp.py", "item_lm.py", "rl_rollouts.py"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name: str, tmp_path: Path) -> None:
    cwd, temporary = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    temporary.mkdir()
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TMPDIR": str(temporary),  # what the examples write goes here by default
    }
    env.pop("WANDB_DIR", None)
    done = subprocess.run(
        _command(name), cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"{name} printed nothing"
    # Run from a checkout, an example writes nothing there that git would pick up (hypothesis
    # keeps its example database in .hypothesis/, which is ignored); the rest goes to TMPDIR.
    ignored = {line.strip("/") for line in (ROOT / ".gitignore").read_text().split()}
    written = sorted(p.name for p in cwd.iterdir())
    assert set(written) <= ignored, f"{name} wrote {written} into the working directory"
