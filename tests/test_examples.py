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
DISTRIBUTED = {"ddp.py"}


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
    assert {"manual_loop.py", "amp.py", "item_lm.py"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        _command(name), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"{name} printed nothing"
