"""AccumulationConfig: read from YAML and the config stacks, checked like init, and training
built from it equal to large-batch training."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

import accumfn
from accumfn import AccumulationConfig, ConfigError, GradientAccumulator, scale_lr
from accumfn.errors import MissingDependencyError

from .support import data, large_batch_run, max_param_diff, mlp, mse, twin, windows_of

ROOT = Path(__file__).resolve().parents[1]
SEED_FILE = ROOT / "examples" / "config.yaml"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_seed_file_reads_unchanged() -> None:
    assert SEED_FILE.read_text() == (
        "training:\n"
        "  batch_size: 8\n"
        "  gradient_accumulation_steps: 4  # Effective batch size = 8 \u00d7 4 = 32\n"
    )
    config = AccumulationConfig.from_yaml(SEED_FILE)
    assert (config.batch_size, config.gradient_accumulation_steps) == (8, 4)
    assert config.effective_batch_size == 32
    assert config.scaled_learning_rate is None  # not set, never invented
    state = accumfn.init(**config.init_kwargs())
    assert (state.window, state.effective_batch_size) == (4, 32)


@pytest.mark.parametrize(
    ("batch_size", "steps", "effective"), [(1, 8, 8), (2, 4, 8), (4, 4, 16), (8, 4, 32)]
)
def test_seed_table(batch_size: int, steps: int, effective: int, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"training:\n  batch_size: {batch_size}\n  gradient_accumulation_steps: {steps}\n",
    )
    config = AccumulationConfig.from_yaml(path)
    acc = GradientAccumulator.from_config(torch.optim.SGD(mlp(0).parameters(), lr=0.1), config)
    assert config.effective_batch_size == effective == acc.effective_batch_size


def test_from_config_trains_like_one_large_batch(tmp_path: Path) -> None:
    """Windows of 3 micro-batches of 4, clipped, Adam; 7 micro-batches: a short final window."""
    path = write(
        tmp_path,
        "training:\n  batch_size: 4\n  gradient_accumulation_steps: 3\n  max_grad_norm: 0.5\n",
    )
    config = AccumulationConfig.from_yaml(path)
    model = mlp(0)
    reference = twin(model)
    acc = GradientAccumulator.from_config(torch.optim.Adam(model.parameters(), lr=0.02), config)
    x, y = data(0, 4 * 7)
    micro = list(zip(x.split(4), y.split(4), strict=True))
    stepped = [
        acc.accumulate(mse(model, xb, yb), model, is_final_batch=i == len(micro) - 1)
        for i, (xb, yb) in enumerate(micro)
    ]
    assert stepped == [False, False, True, False, False, True, True]
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.02)
    large_batch_run(reference, ref_opt, windows_of(x, y, 4, 3), 0.5)
    assert max_param_diff(model, reference) < 1e-6


def test_functional_api_from_an_epoch_schedule(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "training:\n  batch_size: 2\n  gradient_accumulation_steps: {0: 2, 1: 3}\n"
        "  max_grad_norm: null\n",
    )
    config = AccumulationConfig.from_yaml(path)
    assert config.gradient_accumulation_steps == "{0: 2, 1: 3}"  # the text every stack carries
    assert config.schedule == {0: 2, 1: 3}
    assert [config.steps_at(e) for e in range(3)] == [2, 3, 3]
    assert config.effective_batch_size_at(1) == 6
    model = mlp(1)
    reference = twin(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    state = accumfn.init(**config.init_kwargs())
    for epoch, window in enumerate((2, 3)):
        x, y = data(10 + epoch, 2 * 6)
        assert state.window == window
        for i, (xb, yb) in enumerate(zip(x.split(2), y.split(2), strict=True)):
            state, stepped = accumfn.accumulate(state, mse(model, xb, yb), model)
            assert stepped == ((i + 1) % window == 0)
            if stepped:
                state = accumfn.apply_step(state, optimizer, model)
        state = accumfn.reset_epoch(state, optimizer, model)
        large_batch_run(reference, ref_opt, windows_of(x, y, 2, window), None)
    assert max_param_diff(model, reference) < 1e-6


def test_yaml_numbers_and_nested_sections(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "experiment:\n  training:\n    batch_size: 8\n    gradient_accumulation_steps: 4\n"
        "    learning_rate: 3e-4\n    lr_scaling: linear\n    base_batch_size: 8\n"
        "    max_grad_norm: 1\n",
    )
    config = AccumulationConfig.from_yaml(path, section="experiment.training")
    assert config.learning_rate == 3e-4  # PyYAML alone would read "3e-4" as a string
    assert config.max_grad_norm == 1.0 and isinstance(config.max_grad_norm, float)
    assert config.scaled_learning_rate == pytest.approx(1.2e-3)
    whole = AccumulationConfig.from_yaml(
        write(tmp_path, "batch_size: 2\ngradient_accumulation_steps: 2\n", "flat.yaml"),
        section=None,
    )
    assert whole.effective_batch_size == 4


def test_other_keys_of_the_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "training:\n  batch_size: 8\n  gradient_accumulation_steps: 4\n  epochs: 10\n",
    )
    with pytest.raises(ConfigError, match=r"unknown key 'epochs' with value 10"):
        AccumulationConfig.from_yaml(path)
    assert AccumulationConfig.from_yaml(path, ignore=["epochs"]).batch_size == 8
    assert AccumulationConfig.from_yaml(path, only_known=True).batch_size == 8
    typo = write(tmp_path, "training:\n  batch_size: 8\n  gradient_acumulation_steps: 4\n")
    with pytest.raises(ConfigError, match=r"did you mean 'gradient_accumulation_steps'"):
        AccumulationConfig.from_yaml(typo, only_known=True)  # a near miss is never skipped


def test_from_mapping_serves_dicts_namespaces_and_omegaconf() -> None:
    expected = AccumulationConfig(gradient_accumulation_steps=4, batch_size=8)
    assert AccumulationConfig.from_mapping({"batch_size": 8, "gradient_accumulation_steps": 4}) == (
        expected
    )
    namespace = argparse.Namespace(batch_size=8, gradient_accumulation_steps=4, data_dir="d")
    assert AccumulationConfig.from_mapping(namespace, only_known=True) == expected
    with pytest.raises(ConfigError, match="unknown key 'data_dir'"):
        AccumulationConfig.from_mapping(namespace)
    with pytest.raises(ConfigError, match="needs a mapping"):
        AccumulationConfig.from_mapping([("batch_size", 8)])


def test_omegaconf_and_hydra_structured_configs() -> None:
    omegaconf = pytest.importorskip("omegaconf")
    conf = omegaconf.OmegaConf.create(
        {"base": 4, "training": {"batch_size": "${base}", "gradient_accumulation_steps": {0: 8}}}
    )
    config = AccumulationConfig.from_mapping(conf.training)
    assert (config.batch_size, config.gradient_accumulation_steps) == (4, "{0: 8}")
    # Hydra's structured configs: the dataclass is the schema, merged values are checked.
    schema = omegaconf.OmegaConf.structured(AccumulationConfig)
    merged = omegaconf.OmegaConf.merge(schema, {"batch_size": 2, "gradient_accumulation_steps": 3})
    built = omegaconf.OmegaConf.to_object(merged)
    assert built == AccumulationConfig(gradient_accumulation_steps=3, batch_size=2)
    bad = omegaconf.OmegaConf.merge(schema, {"batch_size": 0})
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        omegaconf.OmegaConf.to_object(bad)


def test_dataclass_readers_round_trip() -> None:
    """What HfArgumentParser, jsonargparse and pydantic read: the stdlib dataclass fields."""
    config = AccumulationConfig(
        gradient_accumulation_steps={0: 4, 2: 2}, batch_size=8, max_grad_norm=1.0,
        learning_rate=0.1, skip_nonfinite=True,
    )  # fmt: skip
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    assert AccumulationConfig(**fields) == config
    assert AccumulationConfig.from_mapping(dataclasses.asdict(config)) == config
    assert all("help" in f.metadata for f in dataclasses.fields(config))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 4  # type: ignore[misc]
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        dataclasses.replace(config, batch_size=0)
    pydantic = pytest.importorskip("pydantic")
    adapter = pydantic.TypeAdapter(AccumulationConfig)
    assert adapter.validate_python(fields) == config


def test_checks_and_messages_are_inits() -> None:
    for bad in ("4", 0, 1.5, True):
        with pytest.raises(ConfigError) as from_config:
            AccumulationConfig(gradient_accumulation_steps=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigError) as from_init:
            accumfn.init(bad)  # type: ignore[arg-type]
        core_message = str(from_init.value).replace("steps", "gradient_accumulation_steps", 1)
        assert str(from_config.value).startswith(core_message)
    for kwargs in ({"max_grad_norm": math.nan}, {"batch_size": 2.5}, {"skip_nonfinite": "yes"}):
        with pytest.raises(ConfigError) as from_config:
            AccumulationConfig(**kwargs)  # type: ignore[arg-type]
        with pytest.raises(ConfigError) as from_init:
            accumfn.init(2, **kwargs)  # type: ignore[arg-type]
        assert str(from_config.value).startswith(str(from_init.value))
    with pytest.raises(ConfigError, match="a callable schedule cannot be written in a config"):
        AccumulationConfig(gradient_accumulation_steps=lambda step: 2)  # type: ignore[arg-type]


def test_learning_rate_scaling() -> None:
    assert scale_lr(3e-4, 8, 32) == pytest.approx(1.2e-3)
    assert scale_lr(3e-4, 8, 32, rule="sqrt") == pytest.approx(6e-4)
    assert scale_lr(0.1, 256, 64) == pytest.approx(0.025)
    assert scale_lr(0.1, 8, 32, rule="none") == 0.1
    with pytest.raises(ConfigError, match=r"rule must be one of .*got 'squared'"):
        scale_lr(0.1, 8, 32, rule="squared")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="base_batch_size must be >= 1, got 0"):
        scale_lr(0.1, 0, 32)
    with pytest.raises(ConfigError, match="base_lr must be a finite number > 0"):
        scale_lr(-0.1, 8, 32)
    default = AccumulationConfig(gradient_accumulation_steps=4, batch_size=8, learning_rate=0.1)
    assert default.lr_scaling == "none" and default.scaled_learning_rate == 0.1
    sqrt = dataclasses.replace(default, lr_scaling="sqrt", base_batch_size=8)
    assert sqrt.scaled_learning_rate == pytest.approx(0.2)
    with pytest.raises(ConfigError, match="changes by epoch"):
        dataclasses.replace(sqrt, gradient_accumulation_steps={0: 2})
    with pytest.raises(ConfigError, match=r"needs one effective batch size|no single effective"):
        _ = AccumulationConfig(gradient_accumulation_steps={0: 2}).effective_batch_size


def test_from_config_keeps_the_optimizer_and_takes_the_rest() -> None:
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    config = AccumulationConfig(
        gradient_accumulation_steps=2, batch_size=4, learning_rate=0.1, lr_scaling="linear",
        base_batch_size=4, skip_nonfinite=True, max_grad_norm=None,
    )  # fmt: skip
    acc = GradientAccumulator.from_config(optimizer, config, scheduler=scheduler)
    assert acc.scheduler is scheduler and acc.state.config.skip_nonfinite
    assert acc.state.config.max_grad_norm is None  # the config's value, not the class default
    assert optimizer.param_groups[0]["lr"] == 0.3  # never changed by accumfn
    with pytest.raises(ConfigError, match="config must be an AccumulationConfig, got dict"):
        GradientAccumulator.from_config(optimizer, {"batch_size": 4})  # type: ignore[arg-type]


def test_missing_ruamel_yaml_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ruamel.yaml", None)  # import ruamel.yaml raises
    with pytest.raises(MissingDependencyError, match=r"pip install 'accumfn\[config\]'"):
        AccumulationConfig.from_yaml(SEED_FILE)
    assert isinstance(MissingDependencyError("x"), ImportError)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("training: [1, 2\n", r"is not valid YAML at line 2"),
        ("", r"is empty"),
        ("training: 8\n", r"\[training\] must be a mapping of settings .*got 8"),
        ("- 1\n", r"has no 'training' section \(top-level keys: none\)"),
    ],
)
def test_unreadable_files(text: str, words: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=words):
        AccumulationConfig.from_yaml(write(tmp_path, text))
