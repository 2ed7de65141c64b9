"""Property: windows the caller closes (``steps=None``) equal the large batch, whatever
their lengths.

Windows of 1 to 64 micro-batches, a different length each, are closed by
``is_final_batch=True`` on their last micro-batch or by ``flush`` after it. Mean mode must
equal one step on the mean over the window's samples (equal-sized micro-batches), item mode
one step on the mean over the window's unmasked items (some micro-batches have none).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import accumfn

from .conftest import record

FEATURES, OUTPUTS, MICRO = 3, 2, 2


@st.composite
def setups(draw: Any) -> dict[str, Any]:
    return {
        "seed": draw(st.integers(0, 2**16)),
        "lengths": draw(st.lists(st.integers(1, 64), min_size=1, max_size=4)),
        "item_mode": draw(st.booleans()),
        "close": draw(st.sampled_from(["functional", "object", "flush"])),
        "max_grad_norm": draw(st.sampled_from([None, 0.05])),
        "mask_rate": draw(st.sampled_from([0.0, 0.5, 0.9])),
    }


def window_data(setup: dict[str, Any]) -> list[list[tuple[torch.Tensor, ...]]]:
    """Per window, its micro-batches (x, y, mask); the first item of a window stays."""
    g = torch.Generator().manual_seed(setup["seed"])
    windows = []
    for length in setup["lengths"]:
        batches = []
        for _ in range(length):
            x = torch.randn(MICRO, FEATURES, generator=g, dtype=torch.float64)
            y = torch.randn(MICRO, OUTPUTS, generator=g, dtype=torch.float64)
            mask = (torch.rand(MICRO, generator=g) >= setup["mask_rate"]).double()
            batches.append((x, y, mask))
        batches[0][2][0] = 1.0
        windows.append(batches)
    return windows


def summed(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> Any:
    return (((model(x) - y) ** 2).sum(-1) * mask).sum()


def large_batch(model: nn.Module, windows: Any, setup: dict[str, Any]) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for batches in windows:
        x, y, mask = (torch.cat(parts) for parts in zip(*batches, strict=True))
        if setup["item_mode"]:
            loss = summed(model, x, y, mask) / mask.sum()
        else:
            loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if setup["max_grad_norm"] is not None:
            nn.utils.clip_grad_norm_(model.parameters(), setup["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def accumulated(model: nn.Module, windows: Any, setup: dict[str, Any]) -> accumfn.AccumState:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    clip, close = setup["max_grad_norm"], setup["close"]
    state = accumfn.init(None, max_grad_norm=clip)
    acc = None if close == "functional" else accumfn.GradientAccumulator(optimizer, None, clip)
    for batches in windows:
        for i, (x, y, mask) in enumerate(batches):
            last = i == len(batches) - 1 and close != "flush"
            if setup["item_mode"]:
                loss, items = summed(model, x, y, mask), int(mask.sum())
            else:
                loss, items = nn.functional.mse_loss(model(x), y), None
            if acc is not None:
                assert acc.accumulate(loss, model, is_final_batch=last, num_items=items) == last
                continue
            state, stepped = accumfn.accumulate(
                state, loss, model, is_final_batch=last, num_items=items
            )
            assert stepped == last
            if stepped:
                state = accumfn.apply_step(state, optimizer, model)
        if acc is not None and close == "flush":
            assert acc.flush(model)
    return state if acc is None else acc.state


@settings(max_examples=60, deadline=None)
@given(setups())
def test_caller_closed_windows_equal_the_large_batch(setup: dict[str, Any]) -> None:
    torch.manual_seed(setup["seed"])
    model = nn.Sequential(nn.Linear(FEATURES, 4), nn.Tanh(), nn.Linear(4, OUTPUTS)).double()
    twin = copy.deepcopy(model)
    windows = window_data(setup)
    state = accumulated(model, windows, setup)
    large_batch(twin, windows, setup)
    assert state.optimizer_steps == len(setup["lengths"]) and not state.is_accumulating
    assert state.total_micro_steps == sum(setup["lengths"])
    diff = max(
        float((a.detach() - b.detach()).abs().max())
        for a, b in zip(model.parameters(), twin.parameters(), strict=True)
    )
    record("caller-closed windows (fp64)", diff)
    assert diff < 1e-10, diff
