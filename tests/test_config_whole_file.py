"""The whole file as the section: ``section=None`` or ``""`` in ``from_yaml``, ``--section ''``
in ``accumfn check`` and ``accumfn plan``, as the missing-section message says."""

from __future__ import annotations

from pathlib import Path

import pytest

from accumfn import AccumulationConfig, ConfigError
from accumfn.cli import main


def test_the_missing_section_message_gives_the_command_line_spelling(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("gradient_accumulation_steps: 4\nbatch_size: 8\n")
    with pytest.raises(ConfigError, match="--section '' for the whole file"):
        AccumulationConfig.from_yaml(path)
    expected = AccumulationConfig(gradient_accumulation_steps=4, batch_size=8)
    assert AccumulationConfig.from_yaml(path, None) == expected
    assert AccumulationConfig.from_yaml(path, "") == expected


def test_plan_reads_the_whole_file_with_an_empty_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("gradient_accumulation_steps: 4\nbatch_size: 8\nmax_grad_norm: null\n")
    assert main(["plan", "--config", str(path), "--section", ""]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path} [whole file]\n")
    assert "        8                            4                    32  <- config" in out
    assert "clipping: off (max_grad_norm: null)" in out
    assert f"AccumulationConfig.from_yaml({str(path)!r}, '')" in out


def test_check_reads_the_whole_file_with_an_empty_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("gradient_accumulation_steps: 3\nbatch_size: 2\n")
    assert main(["check", "--config", str(path), "--section", ""]) == 0
    out = capsys.readouterr().out
    assert f"{path} [whole file]" in out
    assert "2 windows of 3 and 2 micro-batches (2 samples each)" in out
