"""Property: item counts given as tensors (or mixed with ints) give the large batch's update
and loss, over ragged counts, empty micro-batches and empty windows, with no host read
inside a window and at most one per window.

Windows have random lengths (a schedule), the last one usually short (``is_final_batch``).
A window without items anywhere is skipped by accumfn and by the reference (no step), and
its loss is nan (the large batch's empty mean).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import accumfn
from accumfn.testing import HostSyncCounter

from .conftest import record
from .test_item_equivalence import IGNORE, OPTIMIZERS, build, token_loss


@st.composite
def setups(draw: Any) -> dict[str, Any]:
    windows = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    micro = sum(windows)
    return {
        "seed": draw(st.integers(0, 2**16)),
        "vocab": draw(st.integers(2, 8)),
        "seq_len": draw(st.integers(2, 6)),
        "windows": windows,
        "final_cut": draw(st.integers(0, windows[-1] - 1)),  # micro-batches the data lacks
        "rows": draw(st.lists(st.integers(1, 3), min_size=micro, max_size=micro)),
        "mask": draw(
            st.lists(st.sampled_from([0.0, 0.5, 0.9, 1.0]), min_size=micro, max_size=micro)
        ),
        "counts": draw(st.sampled_from(["tensor", "mixed"])),
        "optimizer": draw(st.sampled_from(sorted(OPTIMIZERS))),
        "api": draw(st.sampled_from(["functional", "object"])),
    }


def _micro_batches(setup: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sequences split into micro-batches of ``rows``; a mask rate of 1.0 empties one."""
    g = torch.Generator().manual_seed(setup["seed"])
    out = []
    for rows, rate in zip(setup["rows"], setup["mask"], strict=True):
        seqs = torch.randint(0, setup["vocab"], (rows, setup["seq_len"]), generator=g)
        labels = seqs[:, 1:].clone()
        masked = torch.rand(labels.shape, generator=g) < rate
        if rate == 1.0:
            masked = torch.ones_like(masked)
        out.append((seqs[:, :-1], labels.masked_fill(masked, IGNORE)))
    return out


class _Schedule:
    def __init__(self, windows: list[int]) -> None:
        self.windows = windows

    def __call__(self, step: int) -> int:
        return self.windows[min(step, len(self.windows) - 1)]


@settings(max_examples=60, deadline=None)
@given(setups())
def test_tensor_counts_equal_the_large_batch_update_and_loss(setup: dict[str, Any]) -> None:
    windows = list(setup["windows"])
    schedule = _Schedule(windows)
    windows[-1] -= setup["final_cut"]  # the data ends inside the last planned window
    batches = _micro_batches(setup)[: sum(windows)]
    model, ref = build(setup["seed"], setup["vocab"], 3), build(setup["seed"], setup["vocab"], 3)
    make_opt = OPTIMIZERS[setup["optimizer"]]
    opt = make_opt(model.parameters())
    state = accumfn.init(schedule, max_grad_norm=None)
    acc = accumfn.GradientAccumulator(opt, schedule, max_grad_norm=None)
    losses: list[float] = []
    reads: list[tuple[bool, int]] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the window closed with num_items=0")
        for i, (x, y) in enumerate(batches):
            count: int | torch.Tensor = (y != IGNORE).sum()
            if setup["counts"] == "mixed" and i % 2:
                count = int(count)
            loss, final = token_loss(model, x, y, "sum"), i == len(batches) - 1
            with HostSyncCounter() as counter:
                if setup["api"] == "object":
                    stepped = acc.accumulate(loss, model, is_final_batch=final, num_items=count)
                    window_loss = acc.window_loss
                else:
                    state, stepped = accumfn.accumulate(
                        state, loss, model, is_final_batch=final, num_items=count
                    )
                    if stepped:
                        report = accumfn.step_window(state, opt, model)
                        state, window_loss = report.state, report.window_loss
            reads.append((stepped, len(counter.calls)))
            if stepped:
                assert window_loss is not None
                losses.append(float(window_loss))
    assert all(n == 0 for stepped, n in reads if not stepped)
    if setup["optimizer"] == "sgd":  # (Adam's step reads its step counts on the host)
        assert all(n <= 1 for stepped, n in reads if stepped)

    ref_opt = make_opt(ref.parameters())
    starts = [sum(windows[:w]) for w in range(len(windows))]
    want = []
    for start, length in zip(starts, windows, strict=True):
        window = batches[start : start + length]
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        loss = token_loss(ref, x, y, "mean")
        want.append(float(loss.detach()))
        if int((y != IGNORE).sum()):  # accumfn skips a window without items
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
    assert len(losses) == len(want)
    for got, expected in zip(losses, want, strict=True):
        assert (math.isnan(got) and math.isnan(expected)) or math.isclose(
            got, expected, rel_tol=1e-5, abs_tol=1e-6
        )
    diff = 0.0
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        diff = max(diff, float((p.detach() - q.detach()).abs().max()))
    record("tensor counts, ragged and empty (params)", diff)
    finite = [abs(a - b) for a, b in zip(losses, want, strict=True) if not math.isnan(b)]
    record("tensor counts (window loss)", max(finite, default=0.0), "|loss - large-batch loss|")
