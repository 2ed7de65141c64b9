"""Settings written outside the section read are refused, naming the key and where it is;
never read as the defaults. ``from_yaml``, ``accumfn check`` and ``accumfn plan`` agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from accumfn import AccumulationConfig, ConfigError
from accumfn.cli import main

SECTION = "training:\n  batch_size: 8\n"
REFUSED = {
    "own name at top level": (
        f"gradient_accumulation_steps: 4\n{SECTION}",
        "key 'gradient_accumulation_steps' with value 4 at the top level is outside the "
        "'training' section",
    ),
    "clipping off at top level": (
        f"max_grad_norm: null\n{SECTION}",
        "key 'max_grad_norm' with value None at the top level is outside the 'training' section",
    ),
    "own name in another section": (
        f"model:\n  layers: [{{max_grad_norm: 0.5}}]\n{SECTION}",
        "key 'max_grad_norm' with value 0.5 at 'model.layers[0].max_grad_norm'",
    ),
    "lightning at top level": (
        f"accumulate_grad_batches: 4\n{SECTION}",
        "key 'accumulate_grad_batches' with value 4 at the top level, outside the 'training' "
        "section, is Lightning's Trainer's name for gradient_accumulation_steps: that trainer "
        "would accumulate too",
    ),
    "lightning clipping at top level": (
        f"gradient_clip_val: 0.5\n{SECTION}",
        "that trainer would clip too",
    ),
    "sibling trainer section": (
        f"trainer:\n  accumulate_grad_batches: 4\n{SECTION}",
        "key 'accumulate_grad_batches' with value 4 at 'trainer.accumulate_grad_batches'",
    ),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", REFUSED)
def test_settings_outside_the_section_are_refused_by_every_reader(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, words = REFUSED[case]
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        AccumulationConfig.from_yaml(path)
    assert str(error.value).startswith(f"{path}: ")
    assert words in str(error.value)
    for command in ("check", "plan"):
        assert main([command, "--config", str(path)]) == 2
        out, err = capsys.readouterr()
        assert (out, err) == ("", f"accumfn {command}: {error.value}\n")


@pytest.mark.parametrize(
    "outside",
    [
        "trainer:\n  accumulate_grad_batches: 1\n  gradient_clip_val: null\n",
        "gradient_clip_val: 0\nepochs: 3\n",
        "model:\n  steps: 4\n",  # a common word, not a setting of another trainer's
    ],
)
def test_other_trainers_no_op_outside_the_section_is_read(outside: str, tmp_path: Path) -> None:
    path = write(tmp_path, f"{outside}training:\n  batch_size: 8\n")
    assert AccumulationConfig.from_yaml(path) == AccumulationConfig(batch_size=8)


def test_a_key_outside_the_section_that_the_code_reads_is_ignored_by_its_path(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, f"learning_rate: 0.1\n{SECTION}")
    with pytest.raises(ConfigError, match=re.escape("pass ignore=['learning_rate']")):
        AccumulationConfig.from_yaml(path)
    config = AccumulationConfig.from_yaml(path, ignore=["learning_rate"])
    assert config == AccumulationConfig(batch_size=8)


def test_other_sections_own_batch_size_and_learning_rate_are_theirs(tmp_path: Path) -> None:
    outside = "optimizer:\n  learning_rate: 0.1\ndata:\n  batch_size: 64\n"
    path = write(tmp_path, f"{outside}{SECTION}")
    assert AccumulationConfig.from_yaml(path) == AccumulationConfig(batch_size=8)
    nested = write(tmp_path, f"optimizer:\n  max_grad_norm: 0.5\n{SECTION}")
    with pytest.raises(ConfigError, match=re.escape("'optimizer.max_grad_norm'")):
        AccumulationConfig.from_yaml(nested)


def test_the_whole_file_has_no_outside(tmp_path: Path) -> None:
    path = write(tmp_path, "gradient_accumulation_steps: 4\nbatch_size: 8\n")
    config = AccumulationConfig.from_yaml(path, section=None)
    assert config == AccumulationConfig(gradient_accumulation_steps=4, batch_size=8)
