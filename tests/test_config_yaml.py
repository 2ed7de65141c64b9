"""Config files read as YAML 1.2 says (ruamel.yaml): ``010`` is 10, ``1:30`` and ``yes`` are
text and refused, a key written twice is refused with both line numbers; every error names
the key and the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from accumfn import AccumulationConfig, ConfigError


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(body)
    return path


def test_yaml_1_2_integers_are_read_as_written(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "training:\n  gradient_accumulation_steps: 010\n  batch_size: 0o10\n"
        "  learning_rate: 3e-4\n  base_batch_size: 1_000\n",
    )
    config = AccumulationConfig.from_yaml(path)
    # PyYAML (YAML 1.1) reads 010 as 8; YAML 1.2 reads 10. 0o10 is YAML 1.2's octal 8.
    assert (config.gradient_accumulation_steps, config.batch_size) == (10, 8)
    assert config.learning_rate == 3e-4 and config.base_batch_size == 1000


@pytest.mark.parametrize(
    ("line", "words"),
    [
        # YAML 1.1 reads 1:30 as 90 (base 60); YAML 1.2 as the text "1:30"
        ("gradient_accumulation_steps: 1:30", r"gradient_accumulation_steps must be .*'1:30'"),
        ("batch_size: 1:30", r"batch_size must be an int >= 1, got '1:30' of type str"),
        ("skip_nonfinite: yes", r"skip_nonfinite must be True or False, got 'yes'.* write true"),
        ("max_grad_norm: '1.0'", r"max_grad_norm must be a positive number .* without quotes"),
    ],
)  # fmt: skip
def test_text_where_a_number_or_a_flag_belongs_is_refused(
    line: str, words: str, tmp_path: Path
) -> None:
    path = write(tmp_path, f"training:\n  {line}\n")
    with pytest.raises(ConfigError, match=words) as refused:
        AccumulationConfig.from_yaml(path)
    assert str(refused.value).startswith(f"{path} [training]: ")  # the file and the section


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "training:\n  batch_size: 4\n  gradient_accumulation_steps: 2\n  batch_size: 8\n",
    )
    with pytest.raises(ConfigError) as refused:
        AccumulationConfig.from_yaml(path)
    message = str(refused.value)
    assert str(path) in message
    assert "key 'training.batch_size' is written twice, at line 2 and line 4" in message
    nested = write(
        tmp_path,
        "model:\n  width: 3\n  width: 4\ntraining:\n  batch_size: 4\n",
    )
    with pytest.raises(ConfigError, match=re.escape("'model.width' is written twice, at line 2")):
        AccumulationConfig.from_yaml(nested)  # anywhere in the file, not only in the section


def test_the_section_read_as_a_schedule(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  gradient_accumulation_steps: {0: 2, 3: 4}\n")
    config = AccumulationConfig.from_yaml(path)
    assert config.gradient_accumulation_steps == "{0: 2, 3: 4}"
    assert config.schedule == {0: 2, 3: 4}
    assert [config.steps_at(epoch) for epoch in range(5)] == [2, 2, 2, 4, 4]


def test_tags_that_build_objects_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "training:\n  batch_size: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line 2: could not determine"):
        AccumulationConfig.from_yaml(path)
