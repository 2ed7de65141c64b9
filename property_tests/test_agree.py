"""The ranks' agreement (``core.agree``, ``core.agree_resume``), against a model of the rules."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import attrs
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from accumfn import core
from accumfn.errors import CheckpointError, ConfigError, RankMismatchError


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
        core.window_view(state, rank=rank, final=final, reduces=reduces)
        for rank, (state, (_, _, _, final, reduces, _)) in enumerate(
            zip(states, views, strict=True)
        )
    ]
    n = len(views)
    split = any(
        0 < sum(view[i] for view in views) < n for i in (2, 3, 4, 5)
    )  # item mode, final, reduces, scaled: some ranks but not all
    if split:
        with pytest.raises(RankMismatchError):
            core.agree(headers)
        return
    totals, fallback = core.agree(headers)
    assert fallback == (not views[0][4])
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


_IDENTITY = ("epoch", "optimizer_steps", "skipped_steps", "failures", "scale", "window")


@st.composite
def identities(draw: st.DrawFn) -> tuple[bool, list[dict[str, int]]]:
    """Per rank: the identity fields of a closing window (mostly equal, sometimes not)."""
    ranks = draw(st.integers(2, 6))
    item_mode = draw(st.booleans())
    base = {name: draw(st.integers(0, 3)) for name in _IDENTITY}
    base["window"] = draw(st.integers(1, 4))
    rows = []
    for _ in range(ranks):
        row = dict(base)
        for name in draw(st.lists(st.sampled_from(_IDENTITY), max_size=2, unique=True)):
            row[name] = draw(st.integers(1 if name == "window" else 0, 4))
        rows.append(row)
    return item_mode, rows


def _view(rank: int, item_mode: bool, fields: dict[str, int]) -> core.RankView:
    return core.RankView(
        kind=core.CLOSE,
        rank=rank,
        epoch=fields["epoch"],
        optimizer_steps=fields["optimizer_steps"],
        skipped_steps=fields["skipped_steps"],
        failures=fields["failures"],
        scale=core.float_bits(2.0 ** fields["scale"]),
        window=fields["window"],
        mean_mode=int(not item_mode),
        open=1,
        micro_steps=1,
        items=3 * item_mode,
        item_mode=int(item_mode),
        final=0,
        reduces=1,
        scaled=0,
    )


@settings(max_examples=400)
@given(identities())
def test_ranks_in_different_windows_raise_on_every_rank(
    drawn: tuple[bool, list[dict[str, int]]],
) -> None:
    """The ranks must be in the same window of the same run: effective step, applied and
    skipped windows, epoch, failed steps and GradScaler scale; the planned window too in
    mean mode (in item mode each rank may split its batch its own way)."""
    item_mode, rows = drawn
    views = [_view(rank, item_mode, row) for rank, row in enumerate(rows)]
    compared = [name for name in _IDENTITY if not (item_mode and name == "window")]
    differs = any(row[name] != rows[0][name] for row in rows for name in compared)
    if differs:
        with pytest.raises(RankMismatchError) as info:
            core.agree(views)
        assert "rank" in str(info.value)
        return
    totals, _ = core.agree(views)
    assert totals.ranks == len(rows)


def test_message_names_the_ranks_and_their_steps() -> None:
    views = [
        _view(
            0,
            False,
            dict(epoch=0, optimizer_steps=2, skipped_steps=0, failures=0, scale=0, window=4),
        ),
        _view(
            1,
            False,
            dict(epoch=0, optimizer_steps=1, skipped_steps=0, failures=0, scale=0, window=4),
        ),
    ]
    with pytest.raises(
        RankMismatchError,
        match=r"rank 0 is in effective step 2, rank 1 in "
        r"effective step 1.*resume every rank from the same step",
    ):
        core.agree(views)


def test_a_failed_step_names_the_rank_and_why() -> None:
    fields = dict(epoch=0, optimizer_steps=2, skipped_steps=0, failures=0, scale=0, window=4)
    views = [_view(0, False, fields), _view(1, False, {**fields, "failures": 1})]
    problem = core.identity_problem(views, ["", "StepError in before_step: disk full"])
    assert problem is not None
    assert "failed on rank(s) [1] and not on rank(s) [0]" in problem
    assert "disk full" in problem


def test_a_close_meeting_a_resume_is_refused() -> None:
    fields = dict(epoch=0, optimizer_steps=2, skipped_steps=0, failures=0, scale=0, window=4)
    views = [_view(0, False, fields), attrs.evolve(_view(1, False, fields), kind=core.RESUME)]
    with pytest.raises(
        RankMismatchError,
        match=r"rank\(s\) \[0\] close a window; rank\(s\) \[1\] load a checkpoint",
    ):
        core.agree(views)


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.booleans(), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    st.integers(1, 4),
)
def test_resume_agrees_only_on_one_step_and_own_checkpoints(
    ranks: list[tuple[int, int, bool, bool]], world: int
) -> None:
    """(effective step, micro-step, own checkpoint, refused) per rank: the ranks resume only
    from the same step and micro-step, each mid-window checkpoint its own rank's, in a job of
    the size that took it, and none refused."""
    views = []
    for rank, (step, micro, own, refused) in enumerate(ranks):
        state = core.init(4)
        for _ in range(step):
            state, _ = core.micro_step(state, is_final_batch=True)
            state = core.finish_step(core.close_window(state), applied=True)
        for _ in range(micro):
            state, _ = core.micro_step(state)
        saved_by = (rank if own else rank + 1, world) if micro else None
        views.append(core.resume_view(state, rank=rank, saved_by=saved_by, refused=refused))
    steps = {(step, micro) for step, micro, _, _ in ranks}
    foreign = any(micro and (not own or len(ranks) != world) for _, micro, own, _ in ranks)
    refused_any = any(refused for *_, refused in ranks)
    if len(steps) > 1 or foreign or refused_any:
        with pytest.raises(CheckpointError, match="Nothing was loaded"):
            core.agree_resume(views, len(ranks))
        return
    core.agree_resume(views, len(ranks))


_SETTINGS: dict[str, list[Any]] = {
    "max_grad_norm": [None, 0.5, 1.0],
    "skip_nonfinite": [False, True],
    "accum_dtype": [None, "float32", "float64"],
    "sync_every_micro_step": [False, True],
    "steps": [2, {0: 2}, "callable", None],
}


def _config(values: dict[str, Any]) -> core.AccumState | None:
    """A state of these settings with one micro-step taken (None: they do not combine)."""
    steps = values["steps"]
    try:
        state = core.init(
            (lambda step: 2) if steps == "callable" else steps,
            max_grad_norm=values["max_grad_norm"],
            skip_nonfinite=values["skip_nonfinite"],
            accum_dtype=values["accum_dtype"],
            sync_every_micro_step=values["sync_every_micro_step"],
        )
    except ConfigError:
        return None
    return core.micro_step(state)[0]


@st.composite
def rank_settings(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Per rank: the settings that must agree (mostly equal, sometimes one or two apart)."""
    base = {name: draw(st.sampled_from(values)) for name, values in _SETTINGS.items()}
    ranks = []
    for _ in range(draw(st.integers(2, 5))):
        mine = dict(base)
        for name in draw(st.lists(st.sampled_from(list(_SETTINGS)), max_size=2, unique=True)):
            mine[name] = draw(st.sampled_from(_SETTINGS[name]))
        ranks.append(mine)
    return ranks


@settings(max_examples=400)
@given(rank_settings())
def test_ranks_built_with_other_settings_raise_naming_each_setting(
    ranks: list[dict[str, Any]],
) -> None:
    """Every rank's window carries a digest of the settings that change the update; ranks
    whose settings differ raise on every rank (at a close, an open and a resume), and
    given every rank's settings the message names each differing setting and every value."""
    states = [_config(values) for values in ranks]
    live = [state for state in states if state is not None]
    assume(len(live) == len(states))
    configs = [state.config for state in live]
    shown = [core.settings_of(config) for config in configs]
    differing = [
        index for index in range(len(shown[0])) if len({mine[index] for mine in shown}) > 1
    ]
    digests = {core.settings_digest(config) for config in configs}
    assert (len(digests) > 1) == bool(differing)
    assert all(0 <= digest < 2**63 for digest in digests)
    closes = [
        core.window_view(state, rank=rank, final=True, reduces=False)
        for rank, state in enumerate(live)
    ]
    opens = [core.open_view(state, rank=rank) for rank, state in enumerate(live)]
    resumes = [
        core.resume_view(state, rank=rank, saved_by=(rank, len(live)))
        for rank, state in enumerate(live)
    ]
    if not differing:
        assert core.identity_problem(closes) is None
        core.agree_open(opens)
        core.agree_resume(resumes, len(live))
        return
    if len({values["steps"] is None for values in ranks}) > 1:  # its own message comes first
        with pytest.raises(RankMismatchError, match="close their windows themselves"):
            core.agree(closes)
        with pytest.raises(RankMismatchError, match="close their windows themselves"):
            core.agree_open(opens)
        return
    with pytest.raises(RankMismatchError, match="other settings"):
        core.agree(closes)
    with pytest.raises(RankMismatchError, match="other settings"):
        core.agree_open(opens)
    with pytest.raises(CheckpointError, match="other settings"):
        core.agree_resume(resumes, len(live))
    problem = core.identity_problem(closes, settings=shown)
    assert problem is not None
    named = problem.split(": the ranks would step apart")[0]
    for index, (name, _) in enumerate(shown[0]):
        assert (f"{name}=" in named) == (index in differing), (name, problem)
    for index in differing:
        for mine in shown:
            assert mine[index][1] in named
    with pytest.raises(CheckpointError, match=f"{shown[0][differing[0]][0]}="):
        core.agree_resume(resumes, len(live), shown)


def test_the_settings_message_reads_as_written() -> None:
    clipped, unclipped = core.init(4), core.init(4, max_grad_norm=None)
    views = [
        core.window_view(core.micro_step(state)[0], rank=rank, final=False, reduces=True)
        for rank, state in enumerate([clipped, unclipped])
    ]
    settings = [core.settings_of(clipped.config), core.settings_of(unclipped.config)]
    problem = core.identity_problem(views, settings=settings)
    assert problem is not None
    assert problem.startswith("rank 0 clips at max_grad_norm=1.0, rank 1 at None: ")
    assert "same max_grad_norm" in problem


def test_the_settings_digest_is_stable_across_processes() -> None:
    """Not Python's salted ``hash``: the same digest in processes of other hash seeds."""
    code = (
        "from accumfn import core; "
        "print(core.settings_digest(core.init(4, accum_dtype='float32').config))"
    )
    seen = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        seen.add(int(out.stdout))
    assert seen == {core.settings_digest(core.init(4, accum_dtype="float32").config)}
