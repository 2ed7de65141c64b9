"""One clipping default, ``max_grad_norm=1.0``, at every entry point: ``accumfn.init``,
``GradientAccumulator``, ``AccumulationConfig`` (so ``from_config``, ``from_yaml`` and
``accumfn check``/``plan``), each equal to a large batch clipped at 1.0 over the same
samples; ``max_grad_norm=None`` turns it off; a saved state keeps its own value."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from pathlib import Path

import pytest
import torch

import accumfn
from accumfn import AccumulationConfig, GradientAccumulator, core
from accumfn.checkpoint import capture, restore
from accumfn.cli import main
from accumfn.cli._check import describe
from accumfn.cli.demo import DemoSettings
from accumfn.errors import CheckpointError

from .support import data, large_batch_run, max_param_diff, mlp, mse, twin, windows_of

WINDOW, MICRO, WINDOWS = 4, 3, 3


def test_every_entry_point_has_the_same_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = core.DEFAULT_MAX_GRAD_NORM
    assert default == 1.0
    optimizer = torch.optim.SGD(mlp(0).parameters(), lr=0.1)
    config_file = tmp_path / "config.yaml"
    config_file.write_text("training:\n  gradient_accumulation_steps: 4\n  batch_size: 8\n")
    from_file = AccumulationConfig.from_yaml(config_file)
    built = GradientAccumulator.from_config(optimizer, from_file)
    seen = {
        "accumfn.init": accumfn.init(WINDOW).config.max_grad_norm,
        "core.init": core.init(WINDOW).config.max_grad_norm,
        "AccumConfig": core.AccumConfig(schedule=WINDOW).max_grad_norm,
        "GradientAccumulator": GradientAccumulator(optimizer, WINDOW).state.config.max_grad_norm,
        "AccumulationConfig": AccumulationConfig().max_grad_norm,
        "from_yaml": from_file.max_grad_norm,
        "from_config": built.state.config.max_grad_norm,
        "init_kwargs": accumfn.init(**from_file.init_kwargs()).config.max_grad_norm,
        "accumfn demo": DemoSettings().max_grad_norm,
    }  # fmt: skip
    assert seen == dict.fromkeys(seen, default)
    signatures = [
        inspect.signature(accumfn.init).parameters["max_grad_norm"].default,
        inspect.signature(GradientAccumulator).parameters["max_grad_norm"].default,
        {f.name: f.default for f in dataclasses.fields(AccumulationConfig)}["max_grad_norm"],
    ]
    assert signatures == [default] * 3
    # the command line says which clipping it runs under
    assert "clipping at max_grad_norm 1.0 (the default)" in describe(from_file)
    assert main(["plan", "--config", str(config_file)]) == 0
    assert "clipping: at max_grad_norm 1.0 (the default)" in capsys.readouterr().out


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def micro_batches() -> tuple[Batches, Batches]:
    x, y = data(7, MICRO * WINDOW * WINDOWS)
    y = y * 20  # gradients whose norm is well above 1: clipping changes the update
    micro = list(zip(x.split(MICRO), y.split(MICRO), strict=True))
    return micro, windows_of(x, y, MICRO, WINDOW)


@pytest.mark.parametrize("clip", ["default", None])
@pytest.mark.parametrize("api", ["init", "GradientAccumulator", "from_config"])
def test_the_default_equals_a_large_batch_clipped_at_1(api: str, clip: str | None) -> None:
    micro, windows = micro_batches()
    model = mlp(3)
    reference = twin(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    kwargs = {} if clip == "default" else {"max_grad_norm": None}
    norms: list[float] = []
    if api == "init":
        state = accumfn.init(WINDOW, **kwargs)
        for x, y in micro:
            state, stepped = accumfn.accumulate(state, mse(model, x, y), model)
            if stepped:
                state = accumfn.apply_step(state, optimizer, model)
                norms.append(state.last_grad_norm or float("nan"))
    else:
        acc = (
            GradientAccumulator(optimizer, WINDOW, **kwargs)
            if api == "GradientAccumulator"
            else GradientAccumulator.from_config(
                optimizer, AccumulationConfig(gradient_accumulation_steps=WINDOW, **kwargs)
            )
        )
        for x, y in micro:
            if acc.accumulate(mse(model, x, y), model):
                norms.append(acc.stats.last_grad_norm)
    max_norm = 1.0 if clip == "default" else None
    large_batch_run(reference, torch.optim.SGD(reference.parameters(), lr=0.05), windows, max_norm)
    assert len(norms) == WINDOWS
    assert max_param_diff(model, reference) < 1e-6
    if clip == "default":
        assert min(norms) > 1.5  # every window was clipped
        unclipped = twin(mlp(3))
        large_batch_run(unclipped, torch.optim.SGD(unclipped.parameters(), lr=0.05), windows, None)
        assert max_param_diff(model, unclipped) > 1e-3  # and clipping made a difference


def test_a_state_saved_without_clipping_keeps_it() -> None:
    """A checkpoint written before the default changed (max_grad_norm None, format 1 without
    the keys added since) loads with None; resuming it under the new default is refused
    naming the difference, never switched silently."""
    model = mlp(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    old = accumfn.init(WINDOW, max_grad_norm=None).to_dict()
    del old["config"]["accum_dtype"], old["window_scaled"]
    assert core.AccumState.from_dict(old).config.max_grad_norm is None
    saved = capture(accumfn.init(WINDOW, max_grad_norm=None), optimizer)
    with pytest.raises(CheckpointError, match=r"max_grad_norm: checkpoint None, this run 1\.0"):
        restore(saved, accumfn.init(WINDOW), optimizer)
    resumed = restore(saved, accumfn.init(WINDOW, max_grad_norm=None), optimizer)
    assert resumed.config.max_grad_norm is None
    acc = GradientAccumulator(optimizer, WINDOW, max_grad_norm=None)
    assert pickle.loads(pickle.dumps(acc)).state.config.max_grad_norm is None


def test_an_old_pickled_config_loads_as_it_was_saved() -> None:
    """An AccumulationConfig pickled by an earlier version: its epoch schedule a dict, its
    max_grad_norm None (the old default). It loads with None and the schedule as text."""
    old = object.__new__(AccumulationConfig)
    old.__dict__.update(
        gradient_accumulation_steps={0: 2, 3: 4}, batch_size=8, max_grad_norm=None,
        skip_nonfinite=False, sync_every_micro_step=False, learning_rate=None,
        lr_scaling="none", base_batch_size=None,
    )  # fmt: skip
    loaded = pickle.loads(pickle.dumps(old))  # as an earlier version wrote it
    assert loaded.max_grad_norm is None
    assert loaded == AccumulationConfig(
        gradient_accumulation_steps="{0: 2, 3: 4}", batch_size=8, max_grad_norm=None
    )
    assert loaded.schedule == {0: 2, 3: 4}
