"""``accumfn plan --config``: the seed's effective batch table and learning-rate advice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from accumfn import AccumulationConfig
from accumfn.cli import main
from accumfn.config import format_batch_table, same_batch_rows

ROOT = Path(__file__).resolve().parents[1]
SEED_FILE = str(ROOT / "examples" / "config.yaml")


def rows(text: str) -> list[list[str]]:
    """The table rows: lines that start with a number."""
    return [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]


def test_plan_of_the_seed_file_with_linear_scaling(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--config", SEED_FILE, "--lr", "3e-4", "--base-batch", "8", "--rule", "linear"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert ["8", "4", "32", "<-", "config"] in table
    assert {(r[0], r[1], r[2]) for r in table} == {
        ("1", "32", "32"), ("2", "16", "32"), ("4", "8", "32"), ("8", "4", "32"),
        ("16", "2", "32"), ("32", "1", "32"),
    }  # fmt: skip
    assert "learning rate 0.0003 tuned at batch 8; effective batch 32 (x4)" in out
    linear = next(line for line in out.splitlines() if line.strip().startswith("linear"))
    assert linear.split()[:3] == ["linear", "x4", "0.0012"] and linear.endswith("<-")
    assert "Goyal et al. 2017" in linear
    sqrt = next(line for line in out.splitlines() if line.strip().startswith("sqrt"))
    assert sqrt.split()[:3] == ["sqrt", "x2", "0.0006"] and not sqrt.endswith("<-")
    assert "  learning_rate: 0.0012\n" in out and "  lr_scaling: linear\n" in out
    assert "GradientAccumulator.from_config(optimizer, config)" in out


@pytest.mark.parametrize(
    ("batch_size", "steps", "effective"), [(1, 8, 8), (2, 4, 8), (4, 4, 16), (8, 4, 32)]
)
def test_seed_table_rows(
    batch_size: int, steps: int, effective: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--batch-size", str(batch_size), "--steps", str(steps)]) == 0
    marked = [r for r in rows(capsys.readouterr().out) if r[-1] == "this"]
    assert marked == [[str(batch_size), str(steps), str(effective), "<-", "this"]]


def test_epoch_schedule_and_devices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "training:\n  batch_size: 4\n  gradient_accumulation_steps: {0: 8, 4: 4}\n"
        "  learning_rate: 0.001\n  base_batch_size: 32\n  epochs: 10\n"
    )
    argv = ["plan", "--config", str(path), "--devices", "2", "--rule", "sqrt", "--ignore", "epochs"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert rows(out)[:2] == [
        ["4", "8", "2", "64", "epochs", "0-3"],
        ["4", "4", "2", "32", "epochs", "4-"],
    ]
    assert "effective batch 64 in epochs 0-3 (x2)" in out
    sqrt = [line.split()[:3] for line in out.splitlines() if line.strip().startswith("sqrt")]
    assert sqrt == [["sqrt", "x1.414", "0.001414"], ["sqrt", "x1", "0.001"]]


def test_target_with_learning_rate(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--batch-size", "8", "--target", "256", "--devices", "4", "--lr", "0.1",
            "--base-batch", "64"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "accumulation steps (window)    8" in out
    assert "effective batch 256 (x4)" in out and "0.4" in out


def test_same_batch_rows() -> None:
    assert same_batch_rows(8, 4) == [(1, 32), (2, 16), (4, 8), (8, 4), (16, 2), (32, 1)]
    many = same_batch_rows(64, 630)  # 40320 has 96 divisors: the 8 nearest batch 64
    assert len(many) == 8 and (64, 630) in many
    assert "<- config" in format_batch_table(AccumulationConfig(3, batch_size=7))


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["plan", "--config", SEED_FILE, "--lr", "3e-4"], "needs --base-batch"),
        (["plan", "--config", SEED_FILE, "--batch-size", "4"], "leave out --batch-size"),
        (["plan", "--batch-size", "4"], "give --config FILE, or --batch-size with --steps"),
        (["plan", "--target", "32"], "give --config FILE, or --batch-size with --steps"),
        (["plan", "--config", "nope.yaml"], "no config file at 'nope.yaml'"),
    ],
)
def test_bad_plan_arguments(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["plan", "--config", SEED_FILE, "--lr", "-1"], "expected a finite number > 0"),
        (["plan", "--config", SEED_FILE, "--rule", "cubic"], "invalid choice: 'cubic'"),
    ],
)
def test_bad_plan_options_are_argparse_errors(
    argv: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert words in capsys.readouterr().err


def test_plan_and_the_config_import_no_torch() -> None:
    """The modules behind ``accumfn plan --config`` load without torch (the package's
    ``__init__`` is bypassed: it is not what this tests)."""
    code = (
        "import sys, types\n"
        "package = types.ModuleType('accumfn')\n"
        f"package.__path__ = [{str(ROOT / 'accumfn')!r}]\n"
        "sys.modules['accumfn'] = package\n"
        "from accumfn.cli import main\n"
        f"argv = ['plan', '--config', {SEED_FILE!r}, '--lr', '3e-4', '--base-batch', '8']\n"
        "assert main(argv) == 0\n"
        "import accumfn.config, accumfn.config.lr\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "False"
