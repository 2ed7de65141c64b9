"""The ranks' agreement at a window's end (``core.agree``), against a model of the rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accumfn import core
from accumfn.errors import RankMismatchError


@st.composite
def rank_views(
    draw: st.DrawFn,
) -> tuple[int, list[tuple[int, int, bool, bool, bool, bool]]]:
    """A window size and, per rank: micro-steps, items, item mode, final, reduces, scaled."""
    window = draw(st.integers(1, 8))
    ranks = draw(st.integers(1, 8))
    views = []
    for _ in range(ranks):
        k = draw(st.integers(1, window))
        item_mode = draw(st.booleans())
        items = draw(st.integers(1, 50)) * k if item_mode else 0
        flags = (draw(st.booleans()), draw(st.booleans()), draw(st.booleans()))
        views.append((k, items, item_mode, *flags))
    return window, views


def _state(window: int, k: int, items: int, item_mode: bool, scaled: bool) -> core.AccumState:
    state = core.init(window)
    for _ in range(k):
        state, _ = core.micro_step(
            state, num_items=items // k if item_mode else None, scaled=scaled
        )
    return state


@settings(max_examples=400)
@given(rank_views())
def test_agree_raises_exactly_on_a_split_and_rescales_by_the_global_count(
    drawn: tuple[int, list[tuple[int, int, bool, bool, bool, bool]]],
) -> None:
    window, views = drawn
    states = [_state(window, k, items, mode, scaled) for k, items, mode, _, _, scaled in views]
    headers = [
        core.window_header(state, final=final, reduces=reduces)
        for state, (_, _, _, final, reduces, _) in zip(states, views, strict=True)
    ]
    totals = core.WindowTotals.of(headers)
    n = len(views)
    split = any(
        0 < sum(view[i] for view in views) < n for i in (2, 3, 4, 5)
    )  # item mode, final, reduces, scaled: some ranks but not all
    if split:
        with pytest.raises(RankMismatchError):
            core.agree(totals)
        return
    assert core.agree(totals) == (not views[0][4])
    closed = core.close_window(
        states[0],
        global_items=totals.items,
        global_micro_steps=totals.micro_steps,
        averaged_over=n,
    )
    if views[0][2]:  # item mode: averaged over n ranks, divided by all items
        expected = n / sum(items // k * k for k, items, *_ in views)
    else:  # mean mode: each rank divided by the window; the large batch has sum(k) batches
        expected = n * window / sum(k for k, *_ in views)
    assert closed.grad_scale == pytest.approx(expected, rel=1e-12)
