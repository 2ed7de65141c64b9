"""Preemption as a user sees it: SIGKILL a training run, restart it, get the same parameters.

Runs examples/checkpoint_resume.py in fresh processes: the uninterrupted reference from the
command line in a new interpreter; the killed and restarted runs as processes forked from a
server that has only imported torch and accumfn (multiprocessing's forkserver, so a run costs
no import time). Nothing but the checkpoint directory passes from one run to the next.

The run kills itself with SIGKILL at a chosen point: right after any micro-step (before its
checkpoint), or while saving any checkpoint, between writing the temporary file and the
rename. Kill points of each kind are tried one by one, then one run is killed again and again.
Final parameters, counters and GradScaler scale must equal the reference bit for bit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from accumfn.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL and fork")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "checkpoint_resume.py"
TOTAL = 22  # micro-steps of the example (2 epochs of 11)

# plain: GradientAccumulator, epoch schedule {0: 3, 1: 4}, clipping, StepLR, a checkpoint
#   every micro-step; windows end at micro-steps 3 6 9 11 | 15 19 22.
# amp: functional API, callable schedule (2, 2, 2, then 3), bf16 autocast, a GradScaler that
#   overflows now and then, a checkpoint every 2 micro-steps (a restart redoes up to one);
#   windows end at 2 4 6 9 11 | 14 17 20 22.
EVERY = {"plain": 1, "amp": 2}
# A first micro-step, window starts, mid-window steps, boundaries (short one at the epoch's
# end included), an epoch's first micro-step and the last one; saves at a boundary, mid-window
# and the last. ACCUMFN_ALL_KILL_POINTS=1 tries every micro-step and every save instead.
CHOSEN = {
    ("plain", "at"): [1, 3, 4, 5, 11, 12, 17, 19, 22],
    ("plain", "in-save"): [1, 6, 10, 11, 22],
    ("amp", "at"): [1, 2, 3, 8, 9, 12, 16, 21, 22],
    ("amp", "in-save"): [2, 8, 10, 12, 22],
}
ALL = os.environ.get("ACCUMFN_ALL_KILL_POINTS") == "1"
KILL_POINTS = [
    (scenario, kind, at)
    for scenario, every in EVERY.items()
    for kind, points in (("at", range(1, TOTAL + 1)), ("in-save", range(every, TOTAL + 1, every)))
    for at in (points if ALL else CHOSEN[scenario, kind])
]


def run_example(argv: list[str], log: str) -> None:
    """Forked child: run the example's main with its output in ``log`` (line by line)."""
    spec = importlib.util.spec_from_file_location("checkpoint_resume", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with open(log, "w", buffering=1) as out, contextlib.redirect_stdout(out):
        example.main(argv)


FORKSERVER = multiprocessing.get_context("forkserver")
# torch._dynamo: imported lazily by the first optimizer built, and slow to import
FORKSERVER.set_forkserver_preload([__name__, "torch._dynamo"])


def run(run_dir: Path, scenario: str, *flags: str) -> tuple[int | None, list[str]]:
    """Run the example in a forked process; return its exit code and output lines."""
    log = run_dir.parent / f"{run_dir.name}.{len(list(run_dir.parent.glob('*.log')))}.log"
    argv = [str(run_dir), "--scenario", scenario, "--every", str(EVERY[scenario]), *flags]
    proc = FORKSERVER.Process(target=run_example, args=(argv, str(log)))
    proc.start()
    proc.join(timeout=60)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
    return proc.exitcode, log.read_text().splitlines()


def resumed_at(lines: list[str]) -> int:
    first = lines[0] if lines else ""
    return int(first.rsplit(" ", 1)[1]) if first.startswith("resumed at micro-step ") else 0


def last_saved(scenario: str, kind: str, at: int) -> int:
    """Micro-step of the newest complete checkpoint after a kill at (kind, at); 0: none."""
    every = EVERY[scenario]
    return at - every if kind == "in-save" else (at - 1) // every * every


def kill_and_check(run_dir: Path, scenario: str, kind: str, at: int) -> int:
    """Run until killed at (kind, at); check the checkpoint left; return where it resumed."""
    code, lines = run(run_dir, scenario, f"--kill-{kind}", str(at))
    assert code == -signal.SIGKILL and lines[-1].startswith("killed"), (code, lines)
    checkpoint = run_dir / "checkpoint.pt"
    saved = load_checkpoint(checkpoint)["micro_step"] if checkpoint.exists() else 0
    assert saved == last_saved(scenario, kind, at), (kind, at, lines)  # intact, whatever hit
    if kind == "in-save":
        assert list(run_dir.glob(".checkpoint.pt.*.tmp")), "the kill missed the save"
    return resumed_at(lines)


def finish(run_dir: Path, scenario: str) -> tuple[int, dict[str, Any]]:
    code, lines = run(run_dir, scenario)
    assert code == 0, (code, lines)
    return resumed_at(lines), load_checkpoint(run_dir / "final.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """final.pt of uninterrupted runs, from the command line in fresh interpreters."""
    base = tmp_path_factory.mktemp("reference")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = {
        scenario: subprocess.Popen(
            [sys.executable, str(EXAMPLE), str(base / scenario), "--scenario", scenario],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for scenario in EVERY
    }
    finals = {}
    for scenario, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        finals[scenario] = load_checkpoint(base / scenario / "final.pt")
    applied, skipped, micro_steps = finals["amp"]["counters"]
    assert micro_steps == TOTAL and applied > 0 and skipped > 0  # GradScaler state matters
    return finals


def assert_same_run(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["params"].keys() == want["params"].keys()
    for name, tensor in want["params"].items():
        assert torch.equal(got["params"][name], tensor), name
    assert got["counters"] == want["counters"]
    assert got["scale"] == want["scale"]


@pytest.mark.parametrize(("scenario", "kind", "at"), KILL_POINTS)
def test_killed_once_resumes_bit_exactly(
    tmp_path: Path, reference: dict[str, dict[str, Any]], scenario: str, kind: str, at: int
) -> None:
    run_dir = tmp_path / "run"
    kill_and_check(run_dir, scenario, kind, at)
    resumed, final = finish(run_dir, scenario)
    assert resumed == last_saved(scenario, kind, at)
    assert_same_run(final, reference[scenario])


CHAINS = {
    "plain": [("at", 4), ("at", 8), ("at", 9), ("in-save", 11), ("at", 16), ("at", TOTAL)],
    "amp": [("at", 3), ("at", 9), ("in-save", 12), ("at", 17), ("in-save", 20), ("at", TOTAL)],
}


@pytest.mark.parametrize("scenario", sorted(CHAINS))
def test_killed_again_and_again_resumes_bit_exactly(
    tmp_path: Path, reference: dict[str, dict[str, Any]], scenario: str
) -> None:
    run_dir = tmp_path / "run"
    resumes = [kill_and_check(run_dir, scenario, kind, at) for kind, at in CHAINS[scenario]]
    resumed, final = finish(run_dir, scenario)
    saved = [last_saved(scenario, kind, at) for kind, at in CHAINS[scenario]]
    assert [*resumes, resumed] == [0, *saved]
    assert_same_run(final, reference[scenario])
