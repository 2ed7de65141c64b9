"""More trainers' names for accumfn's settings, and accumfn's own names in another case or
with dashes: refused with the name to write, also with ``only_known=True`` and nested."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from accumfn import AccumulationConfig, ConfigError

NAMES = {
    "clip_grad": "max_grad_norm",
    "clip_norm": "max_grad_norm",
    "grad_norm_clip": "max_grad_norm",
    "per_gpu_train_batch_size": "batch_size",
    "device_train_microbatch_size": "batch_size",
    "accum_iter": "gradient_accumulation_steps",
    "update_freq": "gradient_accumulation_steps",
}


@pytest.mark.parametrize("key", NAMES)
@pytest.mark.parametrize("only_known", [False, True])
def test_other_trainers_names_get_a_did_you_mean(key: str, only_known: bool) -> None:
    namespace = argparse.Namespace(**{key: 2}, epochs=3)
    with pytest.raises(ConfigError, match=f"key {key!r} with value 2: did you mean") as error:
        AccumulationConfig.from_mapping(namespace, only_known=only_known, ignore=["epochs"])
    assert f"write {NAMES[key]}: 2." in str(error.value)


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("global_train_batch_size", "'global_train_batch_size' is Composer's effective batch"),
        ("gradient_clip_algorithm", "clipping by norm and by value"),
    ],
)
def test_names_that_mean_something_else_say_what(key: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        AccumulationConfig.from_mapping({key: "norm"}, only_known=True)


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("Max_Grad_Norm", "max_grad_norm"),
        ("BATCH_SIZE", "batch_size"),
        ("gradient-accumulation-steps", "gradient_accumulation_steps"),
    ],
)
def test_own_names_in_another_case_or_with_dashes_are_refused(key: str, field: str) -> None:
    words = f"key {key!r} with value 8: did you mean {field!r}?"
    for only_known in (False, True):
        with pytest.raises(ConfigError, match=words):
            AccumulationConfig.from_mapping({key: 8, "epochs": 3}, only_known=only_known)
    with pytest.raises(ConfigError, match=f"key 'inner' holds {key}: the settings are nested"):
        AccumulationConfig.from_mapping({"inner": {key: 8}}, only_known=True)


def test_a_variant_outside_the_section_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("Gradient-Accumulation-Steps: 4\ntraining:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match="outside the 'training' section"):
        AccumulationConfig.from_yaml(path)


@pytest.mark.parametrize("outside", ["update_freq: [1]\n", "gradient_clip_algorithm: norm\n"])
def test_no_ops_outside_the_section_are_read(outside: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"{outside}training:\n  batch_size: 8\n")
    assert AccumulationConfig.from_yaml(path) == AccumulationConfig(batch_size=8)
