"""What the ranks of a data-parallel group must agree on (no torch).

Whenever the ranks must act together (a window closes, a checkpoint is loaded) each rank
contributes one ``RankView``: which window of which run it is in (its identity: epoch,
steps applied and skipped, failed steps, the GradScaler's scale, the planned window, a
digest of the settings that change the update) and how the window closes (micro-steps,
items, flags). The shell gathers every rank's view and the functions here decide from the
same list on every rank: so every rank raises, or none does, before anything is reduced,
stepped or loaded.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Sequence

import attrs

from ..errors import CheckpointError, ConfigError, RankMismatchError
from ._state import AccumConfig, AccumState, Normalization

__all__ = [
    "CLOSE",
    "ITEMS_COLUMN",
    "LOSS_COLUMN",
    "OPEN",
    "RESUME",
    "SCALE_COLUMN",
    "WIDTH",
    "RankView",
    "Settings",
    "WindowTotals",
    "agree",
    "agree_at_open",
    "agree_open",
    "agree_resume",
    "check_counted_items",
    "float_bits",
    "identity_problem",
    "open_view",
    "resume_view",
    "settings_digest",
    "settings_of",
    "window_header",
    "window_view",
]

CLOSE = 1
"""A view sent when a window closes (``accumulate``'s boundary, ``flush``)."""
RESUME = 2
"""A view sent when a checkpoint is loaded."""
OPEN = 3
"""A view sent at a window's first micro-step under ``sync_every_micro_step`` (there every
backward reduces, so the ranks must agree on the window before its first one)."""
_DOING = {CLOSE: "close a window", RESUME: "load a checkpoint", OPEN: "open a window"}


def float_bits(value: float) -> int:
    """A float as the int64 of its IEEE-754 double bits (equal floats, equal ints)."""
    return int(struct.unpack("<q", struct.pack("<d", float(value)))[0])


def _bits_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", int(bits)))[0])


Settings = tuple[tuple[str, str], ...]
"""(name, value as shown) of each setting the ranks must share (``settings_of``)."""

_STEPS_SHOWN = {
    "constant": "an int",
    "epochs": "{epoch: steps}",
    "callable": "a callable",
    "caller": "None",
}


def settings_of(config: AccumConfig) -> Settings:
    """The settings of ``config`` that change a window's update or its collectives, which
    every rank must share: clipping, the non-finite skip, the accumulation dtype, the sync
    of every micro-step and the kind of schedule (its sizes may differ in item mode, where
    each rank may split its batch its own way; in mean mode the planned window is compared
    on its own). ``batch_size`` only reports, and is left out."""
    norm = config.max_grad_norm
    return (
        ("max_grad_norm", "None" if norm is None else repr(float(norm))),
        ("skip_nonfinite", repr(config.skip_nonfinite)),
        ("accum_dtype", "None" if config.accum_dtype is None else f"torch.{config.accum_dtype}"),
        ("sync_every_micro_step", repr(config.sync_every_micro_step)),
        ("steps", _STEPS_SHOWN[str(config.schedule.to_dict()["kind"])]),
    )


@functools.cache
def _digest(settings: Settings) -> int:
    digest = hashlib.blake2b(repr(settings).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # 63 bits: an int64 >= 0


def settings_digest(config: AccumConfig) -> int:
    """A stable 63-bit digest of ``settings_of(config)`` (the same in every process and
    every run, unlike ``hash``): equal settings, equal digests."""
    return _digest(settings_of(config))


@attrs.frozen
class RankView:
    """One rank's view, exchanged as a row of int64 (``to_row``/``from_row``)."""

    kind: int
    rank: int
    """The rank's global rank, so a message can name it."""
    epoch: int
    optimizer_steps: int
    skipped_steps: int
    failures: int
    """Window steps that raised on this rank since the process started or last resumed."""
    scale: int
    """The GradScaler's scale as ``float_bits`` (0 without one)."""
    window: int
    """The planned window size (0: the caller closes it, ``steps=None``)."""
    mean_mode: int
    """1 unless the window is in item mode (a window's size must agree only in mean mode)."""
    open: int
    micro_steps: int
    items: int
    item_mode: int
    final: int
    reduces: int
    scaled: int
    saved_by: int = -1
    """Resume only: the rank that took this rank's mid-window checkpoint (-1: none)."""
    saved_world: int = 0
    """Resume only: the world size the mid-window checkpoint was taken in (0: none)."""
    refused: int = 0
    """Resume only: 1 if this rank's checkpoint was refused (its own error says why)."""
    loss: int = 0
    """Close only: the sum of the window's losses on this rank as ``float_bits``, written
    by the shell on the device (0 here)."""
    settings: int = 0
    """``settings_digest`` of the rank's config (0: not given, in a view built by hand)."""

    def to_row(self) -> list[int]:
        return [int(value) for value in attrs.astuple(self)]

    @classmethod
    def from_row(cls, row: Sequence[int]) -> RankView:
        return cls(*(int(value) for value in row))

    @property
    def effective_step(self) -> int:
        return self.optimizer_steps + self.skipped_steps


WIDTH = len(attrs.fields(RankView))
"""Integers per rank in an exchange."""
_NAMES = [field.name for field in attrs.fields(RankView)]
SCALE_COLUMN = _NAMES.index("scale")
"""Where the shell writes the GradScaler's scale bits (on the device, with no host read)."""
ITEMS_COLUMN = _NAMES.index("items")
"""Where the shell adds the items counted on the device (or writes the least count when
one was negative), on the device."""
LOSS_COLUMN = _NAMES.index("loss")
"""Where the shell writes the sum of the window's losses as float64 bits, on the device."""


def _identity(state: AccumState, kind: int, rank: int, failures: int, scale: int) -> RankView:
    return RankView(
        kind=kind,
        rank=rank,
        epoch=state.epoch,
        optimizer_steps=state.optimizer_steps,
        skipped_steps=state.skipped_steps,
        failures=failures,
        scale=scale,
        window=state.window,
        mean_mode=int(state.window_norm is not Normalization.ITEMS),
        open=int(state.micro_step > 0),
        micro_steps=state.micro_step,
        items=state.window_items,
        item_mode=int(state.window_norm is Normalization.ITEMS),
        final=0,
        reduces=0,
        scaled=int(state.window_scaled is True),
        settings=settings_digest(state.config),
    )


def agree_at_open(state: AccumState, boundary: bool) -> bool:
    """Whether the ranks exchange their views before this micro-step's backward although
    the window does not close: its first micro-step under ``sync_every_micro_step``, where
    every backward reduces, so ranks planning different windows would otherwise meet in
    different collectives. ``state`` is the state before the micro-step."""
    return state.micro_step == 0 and state.config.sync_every_micro_step and not boundary


def agree_open(views: Sequence[RankView]) -> None:
    """Raise ``RankMismatchError`` unless the ranks open the same window of the same run."""
    problem = identity_problem(views)
    if problem is not None:
        raise RankMismatchError(problem)


def open_view(state: AccumState, *, rank: int, failures: int = 0, scale: int = 0) -> RankView:
    """This rank's view of the window its first micro-step opens (``state`` holds it)."""
    return _identity(state, OPEN, rank, failures, scale)


def window_view(
    state: AccumState,
    *,
    rank: int,
    final: bool,
    reduces: bool,
    failures: int = 0,
    scale: int = 0,
) -> RankView:
    """This rank's view of its closing window (``state`` holds its last micro-step)."""
    view = _identity(state, CLOSE, rank, failures, scale)
    return attrs.evolve(view, final=int(final), reduces=int(reduces))


def resume_view(
    state: AccumState,
    *,
    rank: int,
    saved_by: tuple[int, int] | None,
    scale: int = 0,
    refused: bool = False,
) -> RankView:
    """This rank's view of the state it is about to resume from; ``saved_by`` is the
    (rank, world size) that took its checkpoint inside a window, else None (one process's,
    when the state is inside a window); ``refused``:
    this rank's checkpoint did not pass its own checks."""
    view = attrs.evolve(_identity(state, RESUME, rank, 0, scale), refused=int(refused))
    if saved_by is None:
        if not view.open:
            return view
        saved_by = (0, 1)  # a mid-window checkpoint without a rank record: one process's
    return attrs.evolve(view, saved_by=saved_by[0], saved_world=saved_by[1])


def window_header(state: AccumState, *, final: bool, reduces: bool) -> list[int]:
    """This rank's closing window as the row of integers the ranks exchange."""
    return window_view(state, rank=0, final=final, reduces=reduces).to_row()


@attrs.frozen
class WindowTotals:
    """The closing window over all ranks."""

    ranks: int
    open: int
    """Ranks whose window holds micro-steps (all of them, except at ``flush``)."""
    micro_steps: int
    """Micro-batches in this window over all ranks."""
    items: int
    """Items (``num_items``) in this window over all ranks."""
    item_mode: int
    """Ranks whose window is in item mode."""
    final: int
    """Ranks that closed this window with ``is_final_batch``."""
    reduces: int
    """Ranks whose boundary backward reduces gradients by itself."""
    scaled: int
    """Ranks whose window's losses were scaled by a GradScaler."""

    @classmethod
    def of(cls, views: Sequence[RankView]) -> WindowTotals:
        return cls(
            ranks=len(views),
            open=sum(v.open for v in views),
            micro_steps=sum(v.micro_steps for v in views),
            items=sum(v.items for v in views),
            item_mode=sum(v.item_mode for v in views),
            final=sum(v.final for v in views),
            reduces=sum(v.reduces for v in views),
            scaled=sum(v.scaled for v in views),
        )


def check_counted_items(items: int, rank: int | None = None) -> int:
    """``items``, a window's item count read at its boundary (where the counts given as
    tensors are first read), unless it is negative: then it is the least count of a
    micro-batch (the shell writes that one when a count was negative) and this raises
    ``ConfigError``. ``rank`` names the rank in a job of several."""
    if items >= 0:
        return items
    where = "" if rank is None else f" of rank {rank}"
    raise ConfigError(
        f"num_items was negative ({items}) on a micro-batch{where} of this window: pass the "
        f"number of items each loss sums over, a count >= 0 (e.g. (labels != -100).sum()). "
        f"(Nothing was run for the micro-batch that closes the window.)"
    )


def _some(count: int, ranks: int) -> bool:
    return 0 < count < ranks


def _by_value(views: Sequence[RankView], describe: str, value: str) -> str:
    """``rank 0 is in effective step 2, rank 1 in effective step 1`` (grouped by value)."""
    groups: dict[int, list[int]] = {}
    for view in views:
        groups.setdefault(getattr(view, value), []).append(view.rank)
    parts = []
    for index, (found, ranks) in enumerate(sorted(groups.items(), key=lambda kv: kv[1])):
        who = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks[:8]))
        if len(ranks) > 8:
            who += f" (and {len(ranks) - 8} more)"
        shown = _bits_float(found) if value == "scale" else found
        verb = ("is" if len(ranks) == 1 else "are") if index == 0 else ""
        parts.append(f"{who} {verb} {describe} {shown}".replace("  ", " "))
    return ", ".join(parts)


_SETTINGS_HINT = (
    "build every rank's state or GradientAccumulator with the same max_grad_norm, "
    "skip_nonfinite, accum_dtype, sync_every_micro_step and kind of steps (from one config "
    "for all ranks, not a rank-dependent one)"
)


def _setting_values(views: Sequence[RankView], settings: Sequence[Settings], index: int) -> str:
    """``rank 0 clips at max_grad_norm=1.0, rank 1 at None`` (grouped by value)."""
    name = settings[0][index][0]
    groups: dict[str, list[int]] = {}
    for view, mine in zip(views, settings, strict=True):
        groups.setdefault(mine[index][1], []).append(view.rank)
    verb, again = ("clips at", "at") if name == "max_grad_norm" else ("has", "has")
    parts = []
    for number, (value, ranks) in enumerate(sorted(groups.items(), key=lambda kv: kv[1])):
        who = ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks[:8]))
        if len(ranks) > 8:
            who += f" (and {len(ranks) - 8} more)"
        parts.append(f"{who} {verb} {name}={value}" if number == 0 else f"{who} {again} {value}")
    return ", ".join(parts)


def _settings_problem(views: Sequence[RankView], settings: Sequence[Settings]) -> str:
    """Which settings differ between the ranks, named per rank when ``settings`` (each
    rank's ``settings_of``, gathered on the way to the error) is given."""
    if len(settings) == len(views) and settings:
        named = [
            _setting_values(views, settings, index)
            for index in range(len(settings[0]))
            if len({mine[index] for mine in settings}) > 1
        ]
        if named:
            return (
                f"{'; '.join(named)}: the ranks would step apart (each rank clips, skips "
                f"and reduces its window its own way); {_SETTINGS_HINT}."
            )
    first = views[0].settings
    other = [view.rank for view in views if view.settings != first]
    return (
        f"rank(s) {other} were built with other settings than rank {views[0].rank} "
        f"(max_grad_norm, skip_nonfinite, accum_dtype, sync_every_micro_step or the kind of "
        f"steps): the ranks would step apart; {_SETTINGS_HINT}."
    )


def identity_problem(
    views: Sequence[RankView],
    failure_notes: Sequence[str] = (),
    settings: Sequence[Settings] = (),
) -> str | None:
    """Why these ranks are not in the same window of the same run, or None if they are.

    ``failure_notes``: each rank's last failed step (``""`` if none), to say why it failed.
    ``settings``: each rank's ``settings_of``, to name the settings that differ (the views
    carry only their digest).
    """
    first = views[0]

    def differ(name: str) -> bool:
        return any(getattr(view, name) != getattr(first, name) for view in views)

    closers = [view.rank for view in views if view.window == 0]
    if closers and len(closers) < len(views):
        planners = [view for view in views if view.window != 0]
        return (
            f"rank(s) {closers} close their windows themselves (steps=None) and rank(s) "
            f"{[v.rank for v in planners]} plan windows of {planners[0].window} micro-batches: the "
            f"ranks would close different windows. Give every rank the same accumulation "
            f"steps."
        )
    if differ("settings"):  # first: ranks built apart also meet at different points
        return _settings_problem(views, settings)
    if differ("kind"):
        doing = "; ".join(
            f"rank(s) {[v.rank for v in views if v.kind == kind]} {what}"
            for kind, what in _DOING.items()
            if any(v.kind == kind for v in views)
        )
        return (
            f"the ranks are at different points ({doing}): every rank must load the "
            f"accumulator's checkpoint at the same point (each its own file, or the same "
            f"file), or none, and run the same number of micro-batches per window."
        )
    if differ("failures"):
        most = max(view.failures for view in views)
        bad = [view.rank for view in views if view.failures == most]
        ok = [view.rank for view in views if view.failures != most]
        whys = [
            f"rank {view.rank}: {note}"
            for view, note in zip(views, failure_notes, strict=False)
            if note and view.rank in bad
        ]
        why = f" ({'; '.join(whys)})" if whys else ""
        return (
            f"a window's step failed on rank(s) {bad} and not on rank(s) {ok}{why}: the "
            f"ranks' parameters, optimizer and scheduler states may now differ, so no rank "
            f"goes on. Fix the cause and restart every rank from the last checkpoint all of "
            f"them completed."
        )
    if differ("optimizer_steps") or differ("skipped_steps"):
        steps = _by_value(views, "in effective step", "effective_step")
        if not differ("effective_step"):
            steps = (
                _by_value(views, "with applied windows", "optimizer_steps")
                + " (the others skipped)"
            )
        return (
            f"{steps}: the ranks are in different windows (resumed from checkpoints of "
            f"different steps, or a window was applied on some ranks and skipped on others); "
            f"resume every rank from the same step."
        )
    if differ("epoch"):
        return (
            f"{_by_value(views, 'in epoch', 'epoch')}: call reset_epoch on every rank at the "
            f"same point, and resume every rank from the same step."
        )
    if differ("scale") and not differ("scaled"):  # (a scaler on some ranks: agree says so)
        return (
            f"{_by_value(views, 'at GradScaler scale', 'scale')}: the ranks would average "
            f"gradients scaled differently (a step that failed or was skipped on some ranks "
            f"only, or scalers loaded from different checkpoints); resume every rank from the "
            f"same step with the same scaler state."
        )
    if first.kind == OPEN and differ("window"):
        return (
            f"{_by_value(views, 'planning a window of', 'window')} micro-batches: with "
            f"sync_every_micro_step=True every backward reduces gradients, so the ranks must "
            f"close their windows at the same micro-step; give every rank the same "
            f"accumulation steps (a schedule must not read rank-local state)."
        )
    if first.kind == CLOSE and first.mean_mode and not differ("mean_mode") and differ("window"):
        return (
            f"{_by_value(views, 'planning a window of', 'window')} micro-batches: in mean mode "
            f"each rank divides its losses by its window, so the ranks must plan the same "
            f"window (give every rank the same accumulation steps; a schedule must not read "
            f"rank-local state). To split each rank's batch into a number of micro-batches of "
            f"its own, use item mode (num_items=...), which divides by the items over all ranks."
        )
    return None


def agree(views: Sequence[RankView]) -> tuple[WindowTotals, bool]:
    """Check that the ranks can close this window together; return the window over all
    ranks and whether the gradients need the fallback reduction (no rank's backward
    reduced them).

    Raises ``ConfigError`` when a rank counted a negative ``num_items`` on the device, and
    ``RankMismatchError`` when the ranks are not in the same window
    (``identity_problem``), or when only some are in item mode, only some scaled their
    losses with a GradScaler, only some ended their data (``is_final_batch``), or only some
    ran a reducing backward (a full window on one rank, a short final window on another):
    those ranks would otherwise wait on collectives the others never issue, or average
    different things.
    """
    problem = identity_problem(views)
    if problem is not None:
        raise RankMismatchError(problem)
    for view in views:
        check_counted_items(view.items, view.rank if len(views) > 1 else None)
    totals = WindowTotals.of(views)
    ranks = totals.ranks
    if _some(totals.open, ranks):
        raise RankMismatchError(
            f"{totals.open} of {ranks} ranks have an open window at flush and the others do "
            f"not: the ranks ran different numbers of micro-batches. Give every rank the same "
            f"number of micro-batches (DistributedSampler with drop_last=True)."
        )
    if _some(totals.item_mode, ranks):
        raise RankMismatchError(
            f"{totals.item_mode} of {ranks} ranks passed num_items in this window and the "
            f"others did not: pass num_items on every rank, or on none."
        )
    if _some(totals.scaled, ranks):
        raise RankMismatchError(
            f"{totals.scaled} of {ranks} ranks scaled this window's losses with a GradScaler "
            f"and the others did not: their gradients would be averaged at different scales. "
            f"Pass the same scaler= to accumulate and the step on every rank, or on none."
        )
    if _some(totals.final, ranks):
        raise RankMismatchError(
            f"{totals.final} of {ranks} ranks ended their data (is_final_batch=True) at this "
            f"window and the others did not: the ranks have different numbers of "
            f"micro-batches, so the others would wait for collectives that never come. Give "
            f"every rank the same number of micro-batches (DistributedSampler with "
            f"drop_last=True, or torch.utils.data's equal-length sharding)."
        )
    if _some(totals.reduces, ranks):
        raise RankMismatchError(
            f"{totals.reduces} of {ranks} ranks closed this window with a backward that "
            f"reduces gradients (a full window) while the others closed it early (a short "
            f"final window, is_final_batch=True): the ranks have different numbers of "
            f"micro-batches in their last window. Give every rank the same number of "
            f"micro-batches (DistributedSampler with drop_last=True)."
        )
    return totals, totals.reduces == 0


def agree_resume(views: Sequence[RankView], world: int, settings: Sequence[Settings] = ()) -> None:
    """Raise ``CheckpointError`` (the same on every rank) unless the ranks may resume
    together from the states they loaded: the same window of the same run, and every
    checkpoint taken inside a window taken by the rank loading it, in a job of this size.
    ``settings``: as for ``identity_problem``."""
    refused = [view.rank for view in views if view.refused]
    if refused:
        raise CheckpointError(
            f"rank(s) {refused} refused the checkpoint they loaded (their own error says "
            f"why), so no rank resumes: the ranks must resume from the same step together. "
            f"(Nothing was loaded.)"
        )
    problem = identity_problem(views, settings=settings)
    # (in item mode each rank may split its batch its own way: then their counts differ; so
    # may ranks whose windows the caller closes, window 0, in either mode)
    same_windows = all(v.window == views[0].window for v in views) and views[0].window != 0
    apart = any(v.micro_steps != views[0].micro_steps for v in views)
    if problem is None and same_windows and apart:
        problem = (
            f"{_by_value(views, 'at micro-step', 'micro_steps')} of the window: the ranks' "
            f"checkpoints were taken at different micro-steps; resume every rank from the "
            f"same micro-step."
        )
    if problem is not None:
        raise CheckpointError(f"the ranks cannot resume together: {problem} (Nothing was loaded.)")
    strangers = [v for v in views if v.open and (v.saved_by, v.saved_world) != (v.rank, world)]
    if not strangers:
        return
    view = strangers[0]
    taken = (
        f"taken inside a window ({view.micro_steps} micro-step(s) in) by rank {view.saved_by} "
        f"of {view.saved_world}"
        if view.saved_world > 1
        else f"taken inside a window ({view.micro_steps} micro-step(s) in) on one process"
    )
    raise CheckpointError(
        f"rank {view.rank} of {world} loaded a checkpoint {taken}, so no rank resumes. Each "
        f"rank's open window holds its own gradients, so a checkpoint taken inside a window "
        f"resumes only on the rank that saved it, in a job of the same size: save on every "
        f"rank into a file of its own (f'accum-rank{{rank}}.pt'), use "
        f"accumfn.checkpoint.distributed_state with torch.distributed.checkpoint, or "
        f"checkpoint at a window boundary (state.is_accumulating is False), where rank 0's "
        f"checkpoint serves every rank and any number of ranks. (Nothing was loaded.)"
    )
