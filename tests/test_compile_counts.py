"""``torch.compile`` with item counts given as tensors: no recompile caused by accumfn.

A compiled model (``torch.compile(model)``) and compiled autograd (the backward that
``accumulate`` runs is traced by dynamo: ``torch._dynamo.compiled_autograd._enable``, the
context manager torch 2.13 has; ``torch._dynamo.config.compiled_autograd = True`` only
covers a backward called inside a compiled function) run 3 windows of ragged item counts
and a short final window. After the first window ``error_on_recompile`` is on: a count
that became a Python constant in a graph would recompile at the next window's other
counts, and raise. The backend is ``aot_eager``: dynamo's graphs, guards and recompiles,
and AOTAutograd's joint graph, as with inductor, without its C++ build (minutes here).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo import compiled_autograd
from torch._dynamo.utils import counters

import accumfn

from ._counted_windows import LR, large_batch_losses
from ._dist_utils import make_windows, token_loss, token_model

LENGTHS = (3, 3, 3, 2)  # windows of 3; the last is short (is_final_batch)
BACKEND = "aot_eager"


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)


def _counts() -> dict[str, int]:
    return {
        "frames": counters["frames"]["total"],
        "graphs": counters["stats"]["unique_graphs"],
        "autograd_captures": counters["compiled_autograd"]["captures"],
    }


def _compiled_run(data: Any) -> dict[str, Any]:
    model = token_model(0)
    compiled = torch.compile(model, backend=BACKEND)
    optimizer = _sgd(model)
    state = accumfn.init(3, max_grad_norm=None)
    losses: list[torch.Tensor] = []
    after_first: dict[str, int] = {}
    with compiled_autograd._enable(torch.compile(backend=BACKEND)):
        for w, window in enumerate(data):
            for m, ranks in enumerate(window):
                batch = ranks[0]
                final = w == len(data) - 1 and m == len(window) - 1
                loss = token_loss(compiled, batch, "sum")
                state, stepped = accumfn.accumulate(
                    state, loss, compiled, num_items=(batch[1] != -100).sum(), is_final_batch=final
                )
                if stepped:
                    report = accumfn.step_window(state, optimizer, compiled)
                    state = report.state
                    assert report.window_loss is not None
                    losses.append(report.window_loss)
            if w == 0:
                torch._dynamo.config.error_on_recompile = True
                after_first = _counts()
    return {
        "losses": [float(loss) for loss in losses],
        "params": [p.detach().clone() for p in model.parameters()],
        "after_first": after_first,
        "at_end": _counts(),
    }


def test_compiled_model_and_autograd_do_not_recompile_and_match_the_large_batch() -> None:
    data = make_windows(0, LENGTHS, 2, True, world=1)
    counts = [[int((r[0][1] != -100).sum()) for r in window] for window in data]
    assert len({tuple(c) for c in counts}) == len(LENGTHS)  # every window counts differently
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=False):
        run = _compiled_run(data)
    torch._dynamo.reset()
    print(
        f"compile counters after the first window {run['after_first']}, at the end {run['at_end']}"
    )
    assert run["at_end"] == run["after_first"]  # nothing compiled after the first window
    assert run["after_first"]["autograd_captures"] >= 1  # the backward was compiled
    reference = token_model(0)
    losses = large_batch_losses(reference, _sgd(reference), data, item_mode=True)
    assert run["losses"] == pytest.approx(losses, rel=2e-6)
    for got, want in zip(run["params"], reference.parameters(), strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
