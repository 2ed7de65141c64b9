"""A file ruamel.yaml or Python cannot read as meant gives a ConfigError naming the file from
``from_yaml``, and exit code 2 with that message from ``accumfn check/plan``; never a
traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from accumfn import AccumulationConfig, ConfigError
from accumfn.cli import main

TEXT = "training:\n  batch_size: 8  # café\n"
FILES = {
    "utf-16": (TEXT.encode("utf-16"), "is UTF-16 or UTF-32 text, not UTF-8 (byte 0xff at offset 0"),
    "latin-1": (TEXT.encode("latin-1"), "is not UTF-8 (byte 0xe9 at offset 32"),
    "a key twice in an !!omap": (
        b"training: !!omap\n  - batch_size: 8\n  - batch_size: 4\n",
        "could not be read as YAML (ruamel.yaml raised AssertionError)",
    ),
    "a superscript epoch": (
        "training:\n  gradient_accumulation_steps: {0: 2, '²': 4}\n".encode(),
        "schedule epoch must be an int >= 0, got '²' of type str",
    ),
    "an Arabic-Indic epoch": (
        "training:\n  gradient_accumulation_steps: {'٣': 4}\n".encode(),
        "schedule epoch must be an int >= 0, got '٣' of type str",
    ),
}


@pytest.mark.parametrize("case", FILES)
def test_a_bad_file_is_a_config_error_and_exit_code_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, words = FILES[case]
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as error:
        AccumulationConfig.from_yaml(path)
    assert str(path) in str(error.value)
    assert words in str(error.value)
    for command in ("check", "plan"):
        assert main([command, "--config", str(path)]) == 2
        out, err = capsys.readouterr()
        assert (out, err) == ("", f"accumfn {command}: {error.value}\n")


def test_a_utf8_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(TEXT.encode("utf-8-sig"))
    assert AccumulationConfig.from_yaml(path) == AccumulationConfig(batch_size=8)
