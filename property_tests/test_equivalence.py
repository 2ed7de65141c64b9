"""Property: accumulated training equals large-batch training, step for step."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import accumfn
from tests.support import large_batch_run, max_param_diff, mse

from .conftest import record

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


@st.composite
def setups(draw: Any) -> dict[str, Any]:
    steps = draw(st.integers(1, 8))
    n_micro = draw(st.integers(1, 20))  # multiples of the window and not: short final windows
    return {
        "seed": draw(st.integers(0, 2**16)),
        "widths": draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)),
        "optimizer": draw(st.sampled_from(sorted(OPTIMIZERS))),
        "max_grad_norm": draw(st.sampled_from([None, 0.05, 1.0])),
        "steps": steps,
        "n_micro": n_micro,
        "micro": draw(st.integers(1, 5)),
        "api": draw(st.sampled_from(["functional", "object"])),
    }


def build(seed: int, widths: list[int]) -> nn.Module:
    torch.manual_seed(seed)
    sizes = [4, *widths, 2]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


@settings(max_examples=300, deadline=None)
@given(setups())
def test_accumulated_equals_large_batch(setup: dict[str, Any]) -> None:
    model = build(setup["seed"], setup["widths"])
    ref = build(setup["seed"], setup["widths"])
    steps, micro, n_micro = setup["steps"], setup["micro"], setup["n_micro"]
    g = torch.Generator().manual_seed(setup["seed"])
    x = torch.randn(micro * n_micro, 4, generator=g)
    y = torch.randn(micro * n_micro, 2, generator=g)
    opt = OPTIMIZERS[setup["optimizer"]](model.parameters())
    micro_batches = list(zip(x.split(micro), y.split(micro), strict=True))
    if setup["api"] == "functional":
        state = accumfn.init(steps=steps, max_grad_norm=setup["max_grad_norm"])
        for i, (xb, yb) in enumerate(micro_batches):
            final = i == n_micro - 1
            state, stepped = accumfn.accumulate(
                state, mse(model, xb, yb), model, is_final_batch=final
            )
            if stepped:
                state = accumfn.apply_step(state, opt, model)
        closed = state.effective_step
    else:
        acc = accumfn.GradientAccumulator(opt, steps, max_grad_norm=setup["max_grad_norm"])
        for i, (xb, yb) in enumerate(micro_batches):
            acc.accumulate(mse(model, xb, yb), model, is_final_batch=i == n_micro - 1)
        closed = acc.effective_step
    window = micro * steps
    windows = [(x[s : s + window], y[s : s + window]) for s in range(0, len(x), window)]
    assert closed == len(windows)
    large_batch_run(
        ref, OPTIMIZERS[setup["optimizer"]](ref.parameters()), windows, setup["max_grad_norm"]
    )
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    record("mean-mode equivalence", max_param_diff(model, ref))
