"""``AccumulationConfig`` read by the config stacks users bring, each the real package: a
window of 4 and an epoch schedule, bad values refused with accumfn's message, and the
fields' help texts in ``--help`` and the JSON schema.

Hydra 1.3 (omegaconf 2.3) runs here; ``tests/test_config_omegaconf.py`` runs under both
omegaconf 2.3 and 2.4 (``.ci/run`` runs it again in a second venv with 2.4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import jsonargparse
import pydantic
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from transformers import HfArgumentParser

from accumfn import AccumulationConfig, ConfigError

WINDOW = AccumulationConfig(gradient_accumulation_steps=4, batch_size=8)
SCHEDULE = AccumulationConfig(gradient_accumulation_steps={0: 2, 3: 4}, batch_size=8)
HELP = {field.name: field.metadata["help"] for field in dataclasses.fields(AccumulationConfig)}


def words(text: str) -> str:
    """``text`` with its line breaks and indents as single spaces (argparse wraps help)."""
    return re.sub(r"\s+", " ", text)


def test_the_two_configs() -> None:
    assert WINDOW.schedule == 4 and SCHEDULE.schedule == {0: 2, 3: 4}
    assert WINDOW.max_grad_norm == SCHEDULE.max_grad_norm == 1.0  # the default


def test_hf_argument_parser(tmp_path: Path) -> None:
    parser = HfArgumentParser(AccumulationConfig)
    argv = ["--gradient_accumulation_steps", "4", "--batch_size", "8"]
    assert parser.parse_args_into_dataclasses(argv) == (WINDOW,)
    # argparse has one type per argument (int here): the schedule comes from HF's file readers
    schedule = {"gradient_accumulation_steps": {0: 2, 3: 4}, "batch_size": 8}
    assert parser.parse_dict(schedule) == (SCHEDULE,)
    yaml_file = tmp_path / "accumulation.yaml"
    yaml_file.write_text("gradient_accumulation_steps: {0: 2, 3: 4}\nbatch_size: 8\n")
    assert parser.parse_yaml_file(yaml_file) == (SCHEDULE,)
    json_file = tmp_path / "accumulation.json"
    json_file.write_text(json.dumps({"gradient_accumulation_steps": {"0": 2, "3": 4},
                                     "batch_size": 8}))  # fmt: skip
    assert parser.parse_json_file(json_file) == (SCHEDULE,)  # JSON keys are text
    text = words(parser.format_help())
    assert all(words(help) in text for help in HELP.values())
    assert "--lr_scaling {none,linear,sqrt}" in text
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        parser.parse_args_into_dataclasses(["--batch_size", "0"])


CONFIG_DIR_FILE = """\
defaults:
  - training: accumfn
  - _self_

epochs: 3
training:
  batch_size: 8
  gradient_accumulation_steps: 2
"""


def test_hydra_structured_config(tmp_path: Path) -> None:
    """As a Hydra app: the schema in the ConfigStore, a YAML file, command-line overrides."""
    ConfigStore.instance().store(group="training", name="accumfn", node=AccumulationConfig)
    (tmp_path / "train.yaml").write_text(CONFIG_DIR_FILE)
    schedule_file = CONFIG_DIR_FILE.replace("2\n", "'{0: 2, 3: 4}'\n")
    (tmp_path / "scheduled.yaml").write_text(schedule_file)
    (tmp_path / "mapping.yaml").write_text(CONFIG_DIR_FILE.replace("2\n", "{0: 2, 3: 4}\n"))
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        window = compose("train", overrides=["training.gradient_accumulation_steps=4"])
        schedule = compose(
            "train", overrides=['training.gradient_accumulation_steps="{0: 2, 3: 4}"']
        )
        from_file = compose("scheduled")
        zero = compose("train", overrides=["training.batch_size=0"])
        with pytest.raises(
            ConfigCompositionException, match=r"training\.batch_size=eight"
        ) as typed:
            compose("train", overrides=["training.batch_size=eight"])
        with pytest.raises(ConfigCompositionException, match=r"Cannot assign container"):
            compose("mapping")  # a mapping in a typed file: write the schedule as text
    assert "could not be converted to Integer" in str(typed.value.__cause__)
    assert window.epochs == 3
    assert OmegaConf.to_object(window.training) == WINDOW
    assert OmegaConf.to_object(schedule.training) == SCHEDULE
    assert OmegaConf.to_object(from_file.training) == SCHEDULE
    assert AccumulationConfig.from_mapping(window.training) == WINDOW
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        OmegaConf.to_object(zero.training)


def train(accumulation: AccumulationConfig) -> AccumulationConfig:
    """A training script's entry point for ``jsonargparse.CLI``."""
    return accumulation


def test_jsonargparse(tmp_path: Path) -> None:
    parser = jsonargparse.ArgumentParser(prog="train", exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(AccumulationConfig, "accumulation")
    argv = ["--accumulation.gradient_accumulation_steps", "4", "--accumulation.batch_size", "8"]
    assert parser.instantiate(parser.parse_args(argv)).accumulation == WINDOW
    argv = ["--accumulation.gradient_accumulation_steps", "{0: 2, 3: 4}",
            "--accumulation.batch_size", "8"]  # fmt: skip
    assert parser.instantiate(parser.parse_args(argv)).accumulation == SCHEDULE
    file = tmp_path / "train.yaml"
    file.write_text(
        "accumulation:\n  gradient_accumulation_steps: '{0: 2, 3: 4}'\n  batch_size: 8\n"
    )
    loaded = parser.instantiate(parser.parse_args(["--config", str(file)]))
    assert loaded.accumulation == SCHEDULE
    argv = ["--accumulation.gradient_accumulation_steps", "4", "--accumulation.batch_size", "8"]
    assert jsonargparse.CLI(train, args=argv) == WINDOW  # a training function's argument
    text = io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
        parser.parse_args(["--help"])
    assert all(words(help) in words(text.getvalue()) for help in HELP.values())
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        parser.instantiate(parser.parse_args(["--accumulation.batch_size", "0"]))


def test_pydantic() -> None:
    adapter = pydantic.TypeAdapter(AccumulationConfig)
    assert adapter.validate_python({"gradient_accumulation_steps": 4, "batch_size": 8}) == WINDOW
    text = json.dumps({"gradient_accumulation_steps": "{0: 2, 3: 4}", "batch_size": 8})
    assert adapter.validate_json(text) == SCHEDULE
    assert adapter.validate_json(adapter.dump_json(SCHEDULE)) == SCHEDULE
    schema = adapter.json_schema()["properties"]
    assert {name: schema[name]["description"] for name in HELP} == HELP
    assert schema["lr_scaling"]["enum"] == ["none", "linear", "sqrt"]
    assert schema["max_grad_norm"]["default"] == 1.0
    with pytest.raises(pydantic.ValidationError, match="batch_size must be >= 1, got 0"):
        adapter.validate_python({"batch_size": 0})
