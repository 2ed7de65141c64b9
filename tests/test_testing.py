"""accumfn.testing: the equivalence checker and the hypothesis strategies."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from accumfn.errors import ConfigError
from accumfn.testing import EquivalenceReport, HostSyncCounter, assert_equivalent, plan_windows
from accumfn.testing import strategies as acc_st


def mlp(*extra: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), *extra, nn.Tanh(), nn.Linear(16, 3))


def regression_batches(sizes: list[int], seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 6, generator=generator), torch.randn(n, 3, generator=generator))
        for n in sizes
    ]


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_plain_mlp_is_equivalent_with_short_final_window(name: str) -> None:
    batches = regression_batches([4] * 7)
    report = assert_equivalent(mlp, OPTIMIZERS[name], batches, steps=3, max_grad_norm=0.5)
    assert isinstance(report, EquivalenceReport)
    assert report.windows == (3, 3, 1)
    params = {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert {t.name for t in report.tensors if t.kind == "parameter"} == params
    assert {t.name for t in report.tensors if t.kind == "gradient"} == {f"{p}.grad" for p in params}
    assert report.max_abs < 1e-5 and report.max_param_abs < 1e-5
    assert not report.diverged
    assert report.culprits == ()
    assert "0.weight" in str(report)


def test_ragged_items_with_num_items_are_equivalent() -> None:
    batches = regression_batches([5, 1, 3, 8, 2])
    report = assert_equivalent(
        mlp, OPTIMIZERS["adam"], batches, steps=2, num_items=lambda b: int(b[0].shape[0])
    )
    assert report.windows == (2, 2, 1)


def test_weights_actually_move() -> None:
    # The comparison would be empty if training did nothing: a model whose weights move
    # differently under a different window must be caught.
    batches = regression_batches([4] * 4)
    with pytest.raises(AssertionError, match="diverged"):
        assert_equivalent(
            mlp,
            OPTIMIZERS["sgd"],
            batches,
            steps=2,
            loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1], reduction="sum"),
        )


def test_batchnorm_model_fails_naming_batchnorm() -> None:
    batches = regression_batches([4] * 4)
    with pytest.raises(AssertionError) as error:
        assert_equivalent(lambda: mlp(nn.BatchNorm1d(16)), OPTIMIZERS["sgd"], batches, steps=2)
    message = str(error.value)
    assert "BatchNorm" in message and "'1' (BatchNorm1d)" in message
    assert "0.weight" in message and "max abs" in message
    assert "buffer 1.running_mean" in message


def test_dropout_model_fails_naming_dropout() -> None:
    batches = regression_batches([4] * 4)
    with pytest.raises(AssertionError) as error:
        assert_equivalent(lambda: mlp(nn.Dropout(0.5)), OPTIMIZERS["adam"], batches, steps=2)
    message = str(error.value)
    assert "Dropout '1' (Dropout) with p=0.5 in train mode" in message
    assert "BatchNorm" not in message


def test_dropout_in_eval_mode_passes() -> None:
    batches = regression_batches([4] * 4)
    assert_equivalent(lambda: mlp(nn.Dropout(0.5)).eval(), OPTIMIZERS["adam"], batches, steps=2)


def test_ragged_mean_loss_fails_pointing_to_num_items() -> None:
    batches = regression_batches([6, 1, 4, 4])
    with pytest.raises(AssertionError) as error:
        assert_equivalent(mlp, OPTIMIZERS["sgd"], batches, steps=2)
    message = str(error.value)
    assert "window 0: [6, 1]" in message and "num_items" in message


def test_no_culprit_found_says_so() -> None:
    # the square of a mean is no mean: the accumulated gradients are no multiple either
    batches = regression_batches([4] * 4)
    squared = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]) ** 2  # noqa: E731
    with pytest.raises(AssertionError, match="No known cause found"):
        assert_equivalent(mlp, OPTIMIZERS["sgd"], batches, steps=2, loss_fn=squared)


def test_dict_batches_and_classification_default_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "x": torch.randn(3, 6, generator=generator),
            "y": torch.randint(0, 3, (3,), generator=generator),
        }
        for _ in range(5)
    ]
    report = assert_equivalent(
        mlp,
        OPTIMIZERS["sgd"],
        batches,
        steps=4,
        loss_fn=lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"]),
    )
    assert report.windows == (4, 1)


def test_bad_input_is_refused() -> None:
    model = mlp()
    with pytest.raises(ConfigError, match="same module twice"):
        assert_equivalent(lambda: model, OPTIMIZERS["sgd"], regression_batches([2]), steps=1)
    with pytest.raises(ConfigError, match="batches is empty"):
        assert_equivalent(mlp, OPTIMIZERS["sgd"], [], steps=1)


def test_importing_testing_does_not_import_hypothesis() -> None:
    code = "import sys, accumfn.testing; print('hypothesis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plan_windows_closes_short_final_window() -> None:
    assert plan_windows(3, 7) == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_windows(1, 2) == [[0], [1]]


@settings(max_examples=150, deadline=None)
@given(acc_st.accumulation_splits(max_items=40, max_window=6, max_micro_batch=7))
def test_splits_are_valid(split: acc_st.AccumulationSplit) -> None:
    assert all(1 <= size <= 7 for size in split.sizes)
    covered = [i for s in split.slices() for i in range(s.start, s.stop)]
    assert covered == list(range(split.total))
    assert [i for w in split.windows for i in w] == list(range(len(split.sizes)))
    assert all(len(w) == split.window for w in split.windows[:-1])
    assert 1 <= len(split.windows[-1]) <= split.window


@settings(max_examples=50, deadline=None)
@given(acc_st.accumulation_splits(max_items=20, ragged=False))
def test_even_splits_are_even(split: acc_st.AccumulationSplit) -> None:
    assert len(set(split.sizes[:-1])) <= 1
    assert split.sizes[-1] <= split.sizes[0]


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), acc_st.item_counts(n, max_items=9)))
)
def test_item_counts_match_micro_batches(drawn: tuple[int, list[int]]) -> None:
    count, items = drawn
    assert len(items) == count and all(1 <= n <= 9 for n in items)


@settings(max_examples=15, deadline=None)
@given(acc_st.accumulation_splits(max_items=24, max_window=4, max_micro_batch=6))
def test_accumulation_matches_large_batch_on_ragged_splits(split: acc_st.AccumulationSplit) -> None:
    data = regression_batches([split.total], seed=split.total)[0]
    batches = [(data[0][s], data[1][s]) for s in split.slices()]
    report = assert_equivalent(
        mlp,
        OPTIMIZERS["adamw"],
        batches,
        steps=split.window,
        num_items=lambda b: int(b[0].shape[0]),
        max_grad_norm=1.0,
    )
    assert report.windows == tuple(len(w) for w in split.windows)


def test_host_sync_counter_counts_reads_not_device_ops() -> None:
    x = torch.randn(3, requires_grad=True)
    with HostSyncCounter() as counter:
        y = (x * 2).sum()
        y.detach().to("cpu")  # a CPU tensor copied to the CPU: no sync
        y.backward()
    assert counter.calls == []
    y = y.detach()
    with HostSyncCounter() as counter:
        float(y)
        y.item()
        bool(y > 0)
        x.tolist()
    assert counter.by_name() == {"__float__": 1, "item": 1, "__bool__": 1, "tolist": 1}


def test_host_sync_counter_ignores_optimizer_step_counters() -> None:
    model = nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 2)).sum().backward()
    optimizer.step()  # creates the host-side step counters
    model(torch.randn(4, 2)).sum().backward()
    with HostSyncCounter() as counted:
        optimizer.step()
    assert counted.calls, "Adam reads its step counters on the host"
    counter = HostSyncCounter()
    counter.exclude_optimizer_steps(optimizer)
    with counter:
        optimizer.step()
    assert counter.calls == []


def test_adam_near_zero_gradient_is_not_reported_as_divergence() -> None:
    """Adam turns fp32 rounding in a near-zero gradient entry into a visible weight change;
    the verdict is on the applied gradients, which accumulation is responsible for."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 12), nn.GELU(), nn.Linear(12, 3), nn.GELU(),
                             nn.Linear(3, 2))  # fmt: skip

    generator = torch.Generator().manual_seed(10760)
    batches = [
        (torch.randn(5, 4, generator=generator), torch.randn(5, 2, generator=generator))
        for _ in range(7)
    ]
    report = assert_equivalent(
        make, lambda m: torch.optim.Adam(m.parameters(), lr=0.01), batches, steps=7, seed=10760
    )
    assert report.max_abs < 1e-6
