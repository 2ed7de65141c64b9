"""The window's loss as ``StepReport`` and pickles show it.

``StepReport`` is built, compared, shown and evolved by ``window_loss``; a closed window's
loss pickles by every protocol; a window of one micro-batch keeps its loss without a
division, as a copy that a later in-place change of the loss given does not reach. Each
loss is compared with the large batch's over the same samples.
"""

from __future__ import annotations

import copy
import pickle

import attrs
import pytest
import torch
from torch import nn

import accumfn
from accumfn import StepReport

X = torch.linspace(-1.0, 1.0, 12).reshape(4, 3)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def _large_batch_loss() -> float:
    """The mean of the two micro-batches' mean losses: one batch over the same samples."""
    model = _model()
    with torch.no_grad():
        return float(torch.stack([model(X[:2]).pow(2).mean(), model(X[2:]).pow(2).mean()]).mean())


def _report() -> StepReport:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = accumfn.init(2, max_grad_norm=None)
    for rows in (X[:2], X[2:]):
        state, stepped = accumfn.accumulate(state, model(rows).pow(2).mean(), model)
    assert stepped
    return accumfn.step_window(state, optimizer, model)


def test_a_step_report_is_built_compared_and_shown_by_its_window_loss() -> None:
    report = _report()
    loss = report.window_loss
    assert loss is not None and float(loss) == pytest.approx(_large_batch_loss(), rel=1e-6)
    assert report.window_loss is loss
    assert bool(report == copy.deepcopy(report))
    assert bool(report == pickle.loads(pickle.dumps(report)))
    assert f"={loss!r}" in repr(report)
    other = torch.tensor(2.0, dtype=torch.float64)
    assert attrs.evolve(report, window_loss=other).window_loss is other
    assert StepReport(report.state, True, None, window_loss=other).window_loss is other
    assert attrs.evolve(report, applied=False).window_loss is loss


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("read", [False, True], ids=["unread", "read"])
def test_a_closed_windows_loss_pickles_by_every_protocol(protocol: int, read: bool) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulator = accumfn.GradientAccumulator(optimizer, 2, max_grad_norm=None)
    for rows in (X[:2], X[2:]):
        stepped = accumulator.accumulate(model(rows).pow(2).mean(), model)
    assert stepped
    if read:
        assert accumulator.window_loss is not None
    copied = pickle.loads(pickle.dumps(accumulator, protocol=protocol))
    assert copied.stats.last_window_loss == pytest.approx(_large_batch_loss(), rel=1e-6)
    assert copied.stats.last_window_loss == accumulator.stats.last_window_loss
    report = pickle.loads(pickle.dumps(_report(), protocol=protocol))
    assert float(report.window_loss) == pytest.approx(_large_batch_loss(), rel=1e-6)


@pytest.mark.parametrize("items", [None, 1], ids=["mean", "one item"])
def test_a_window_of_one_keeps_a_copy_of_its_loss(items: int | None) -> None:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulator = accumfn.GradientAccumulator(optimizer, 1, max_grad_norm=None)
    loss = model(X[:1]).pow(2).sum()
    expected = float(loss)
    assert accumulator.accumulate(loss, model, num_items=items)
    kept = accumulator.window_loss
    assert kept is not None and kept.dtype == torch.float64 and float(kept) == expected
    with torch.no_grad():
        loss.mul_(0.0)  # the caller's loss changed in place after the step
    assert float(kept) == expected == accumulator.stats.last_window_loss


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("counts", ["ints", "tensors"])
def test_an_open_window_pickles_by_every_protocol(protocol: int, counts: str) -> None:
    """Mid-window (its running loss and tensor counts beside the state), then closed by the
    copy (the window's gradients carried over by hand: torch pickles no ``.grad``): the same
    loss and parameters as the large batch over the same items."""
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accumulator = accumfn.GradientAccumulator(optimizer, 2, max_grad_norm=None)

    def count(n: int) -> int | torch.Tensor:
        return n if counts == "ints" else torch.tensor(n)

    accumulator.accumulate(model(X[:2]).pow(2).sum(), model, num_items=count(2))
    copied = pickle.loads(pickle.dumps((model, optimizer, accumulator), protocol=protocol))
    model2, _, accumulator2 = copied
    for ours, theirs in zip(model2.parameters(), model.parameters(), strict=True):
        ours.grad = theirs.grad.clone()  # (torch pickles no .grad: the window's, carried over)
    assert accumulator2.accumulate(model2(X[2:]).pow(2).sum(), model2, num_items=count(2))
    reference = _model()
    with torch.no_grad():
        expected = float(reference(X).pow(2).mean())
    reference.zero_grad()
    reference(X).pow(2).mean().backward()
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert accumulator2.stats.last_window_loss == pytest.approx(expected, rel=1e-6)
    for ours, theirs in zip(model2.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)
