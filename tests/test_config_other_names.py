"""A config written for another trainer: ``accumfn check``, ``accumfn plan``, ``from_yaml`` and
``from_mapping`` read it one way, and refuse other trainers' names and settings nested one
level too deep with the key named; none of them falls back to the 1 x 1 defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from accumfn import AccumulationConfig, ConfigError
from accumfn.cli import main
from accumfn.config._names import OTHER_NAMES

FILES = {
    "lightning": (
        "training:\n  accumulate_grad_batches: 4\n  batch_size: 8\n  gradient_clip_val: 0.5\n",
        "key 'accumulate_grad_batches' with value 4: did you mean 'gradient_accumulation_steps'?",
    ),
    "hugging face": (
        "training:\n  gradient_accumulation_steps: 4\n  per_device_train_batch_size: 8\n",
        "key 'per_device_train_batch_size' with value 8: did you mean 'batch_size'?",
    ),
    "deepspeed": (
        "training:\n  gradient_accumulation_steps: 4\n  train_micro_batch_size_per_gpu: 8\n",
        "key 'train_micro_batch_size_per_gpu' with value 8: did you mean 'batch_size'?",
    ),
    "deepspeed effective batch": (
        "training:\n  train_batch_size: 32\n",
        "'train_batch_size' is DeepSpeed's effective batch",
    ),
    "nested one level too deep": (
        "training:\n  accumulation:\n    gradient_accumulation_steps: 4\n    batch_size: 8\n",
        "key 'accumulation' holds gradient_accumulation_steps, batch_size: the settings are "
        "nested one level too deep",
    ),
    "another trainer's names, nested": (
        "training:\n  trainer:\n    accumulate_grad_batches: 4\n",
        "key 'trainer' holds accumulate_grad_batches: the settings are nested one level too deep",
    ),
}


@pytest.mark.parametrize("case", FILES)
@pytest.mark.parametrize("command", ["check", "plan"])
def test_check_and_plan_refuse_as_from_yaml_does(
    case: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text, words = FILES[case]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as from_yaml:
        AccumulationConfig.from_yaml(path)
    assert words in str(from_yaml.value)
    assert str(from_yaml.value).startswith(f"{path} [training]: ")
    assert main([command, "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err == f"accumfn {command}: {from_yaml.value}\n"  # one reader, one message
    assert out == ""  # nothing checked or planned on the defaults


@pytest.mark.parametrize("key", [name for name, other in OTHER_NAMES.items() if not other.generic])
def test_only_known_never_drops_another_trainers_name(key: str) -> None:
    """A whole script's namespace (only_known=True) may hold other keys, but not another
    trainer's name for a setting: dropping it would train with the default."""
    namespace = argparse.Namespace(**{key: 4}, data_dir="data", epochs=3)
    with pytest.raises(ConfigError, match=f"key {key!r} with value 4"):
        AccumulationConfig.from_mapping(namespace, only_known=True)
    kept = AccumulationConfig.from_mapping(namespace, only_known=True, ignore=[key])
    assert kept == AccumulationConfig()  # only by naming it in ignore


def test_generic_words_are_left_to_the_script() -> None:
    """``lr``, ``steps``: an argparse script uses them for its own settings."""
    namespace = argparse.Namespace(lr=0.1, steps=1000, gradient_accumulation_steps=4)
    config = AccumulationConfig.from_mapping(namespace, only_known=True)
    assert config == AccumulationConfig(gradient_accumulation_steps=4)
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        AccumulationConfig.from_mapping(namespace)  # strict: every key is named


def test_ignore_and_section_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "training:\n  epochs: 10\n  accumulation:\n    gradient_accumulation_steps: 4\n"
        "    batch_size: 8\n    max_grad_norm: null\n"
    )
    argv = ["plan", "--config", str(path), "--section", "training.accumulation"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "8                            4                    32  <- config" in out
    assert "clipping: off (max_grad_norm: null)" in out
    assert f"AccumulationConfig.from_yaml({str(path)!r}, 'training.accumulation')" in out
    flat = tmp_path / "flat.yaml"
    flat.write_text("training:\n  epochs: 10\n  gradient_accumulation_steps: 4\n")
    assert main(["plan", "--config", str(flat)]) == 2
    assert "unknown key 'epochs' with value 10" in capsys.readouterr().err
    assert main(["plan", "--config", str(flat), "--ignore", "epochs"]) == 0
    out = capsys.readouterr().out
    assert "clipping: at max_grad_norm 1.0 (the default)" in out
    assert f"AccumulationConfig.from_yaml({str(flat)!r}, ignore=['epochs'])" in out
