"""What a window keeps on the device beside the pure state: its item counts given as
tensors, and the sum of its losses.

The core knows a window's mode and micro-steps, and the items given as ints. The counts
given as 0-dim tensors and every micro-batch's loss stay on their device: each micro-step
adds them, out of place, to running sums the shell keeps beside the state ``accumulate``
returned (``Tally``), and reads nothing. The window's boundary reads the item count once,
inside the exchange that decides the window under data parallelism (or alone, on one
process), and divides the summed losses by the global count on the device: the window's
loss as the large batch computes it (``window_loss``).

A tally follows the state object it was made for (by identity: a copy of a state has none),
so functional states stay values: a state given to ``accumulate`` twice gets two tallies.
The state records how many of its window's counts the tally holds
(``AccumState.window_device_counts``), so a copy whose window has such counts is refused
(``open_tally``) rather than divided by too few items.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import attrs
import torch

from ..core import AccumState, Normalization, check_counted_items
from ..errors import ConfigError

__all__ = [
    "Tally",
    "attach",
    "attach_beside",
    "carry",
    "check_count",
    "closed_loss",
    "extend",
    "items_value",
    "loss_of_window",
    "open_tally",
    "read_items",
    "restore_tally",
    "settle",
    "tally_beside",
]

_INTEGERS = frozenset(
    {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8}
    | {getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name)}
)


def check_count(num_items: torch.Tensor) -> torch.Tensor:
    """``num_items`` if it is a 0-dim integer tensor (checked without reading it: its value,
    negative or not, is read at the window's boundary), else ``ConfigError``."""
    if num_items.ndim != 0:
        raise ConfigError(
            f"num_items must be an int or a 0-dim integer tensor, got a tensor of shape "
            f"{tuple(num_items.shape)}; sum it first (e.g. (labels != -100).sum())."
        )
    if num_items.device.type == "meta":
        raise ConfigError(
            "num_items is a tensor on the meta device, which holds no value to count; count "
            "the items of the batch the loss was computed from, on its device."
        )
    if num_items.dtype not in _INTEGERS:
        raise ConfigError(
            f"num_items must be an int or a 0-dim integer tensor, got a {num_items.dtype} "
            f"tensor; count items with an integer sum (e.g. (labels != -100).sum()), not a "
            f"float or boolean one."
        )
    return num_items


def _loss_dtype(loss: torch.Tensor) -> torch.dtype:
    """float64 for the running loss sum, where the device has it (MPS has not)."""
    return torch.float32 if loss.is_mps else torch.float64


class Tally:
    """The open window's running sums on the device (immutable: each micro-step makes one).

    ``loss``: the sum of the window's detached losses (float64; a float when no micro-step
    of this process added one: the sum restored from a checkpoint, or nan when unknown);
    ``items``: the sum of the counts given as tensors (int64), ``least``: the least of them
    (None without any); ``counted``: how many counts were given as tensors.
    """

    __slots__ = ("counted", "items", "least", "loss")

    def __init__(
        self,
        loss: torch.Tensor | float = 0.0,
        items: torch.Tensor | None = None,
        least: torch.Tensor | None = None,
        counted: int = 0,
    ) -> None:
        self.loss = loss
        self.items = items
        self.least = least
        self.counted = counted

    def __reduce__(self) -> tuple[type[Tally], tuple[object, ...]]:
        """Pickle by every protocol (slots alone pickle from protocol 2 on)."""
        return Tally, (self.loss, self.items, self.least, self.counted)

    def __setstate__(self, saved: tuple[None, dict[str, object]]) -> None:
        """Unpickle a tally pickled by its slots (earlier versions), also before ``counted``
        was kept."""
        self.counted = 0
        for name, value in saved[1].items():
            setattr(self, name, value)


_EMPTY = Tally()
_UNKNOWN = Tally(math.nan)
"""The tally of a window whose earlier micro-steps were not seen (a copied state)."""


def extend(before: Tally | None, loss: torch.Tensor, count: torch.Tensor | None) -> Tally:
    """The tally after one more micro-step, out of place (``before`` is left as it was):
    one add for the loss, two small ops more for a tensor count, no read."""
    before = _EMPTY if before is None else before
    detached = loss.detach()
    earlier = before.loss
    if isinstance(earlier, torch.Tensor):
        total: torch.Tensor = earlier + detached
    else:
        total = detached.to(_loss_dtype(detached), copy=True)
        if earlier != 0.0:
            total = total + earlier
    if count is None:
        return Tally(total, before.items, before.least, before.counted)
    if before.items is None or before.least is None:
        first = count.to(torch.int64, copy=True)
        return Tally(total, first, first, before.counted + 1)
    return Tally(
        total, before.items + count, torch.minimum(before.least, count), before.counted + 1
    )


def items_value(tally: Tally, host_items: int) -> torch.Tensor | None:
    """The window's item count on the device: the tensor counts plus ``host_items`` (the
    ints the state holds), or the least count when one was negative (so the read at the
    boundary catches it). None when no count was a tensor."""
    if tally.items is None or tally.least is None:
        return None
    return torch.where(tally.least < 0, tally.least, tally.items + host_items)


def read_items(value: torch.Tensor) -> int:
    """The window's item count read to the host (its boundary's one read, on one process);
    ``ConfigError`` if a count was negative."""
    return check_counted_items(int(value.item()))


def loss_of_window(
    loss_sum: torch.Tensor | float, state: AccumState, micro_steps: int, items: int
) -> torch.Tensor:
    """The window's loss as the large batch computes it, on the device: the summed losses
    of all ranks over the window's micro-batches of all ranks (mean mode) or its items of
    all ranks (item mode; nan for a window without items, as the large batch's empty mean)."""
    divisor = items if state.window_norm is Normalization.ITEMS else micro_steps
    if not isinstance(loss_sum, torch.Tensor):
        loss_sum = torch.tensor(loss_sum, dtype=torch.float64)
    if divisor == 1:  # a window of one micro-batch (mean mode): its sum, already a copy
        return loss_sum
    return loss_sum / divisor if divisor else loss_sum * math.nan


# -- the tallies beside the states ---------------------------------------------------------

_BESIDE: dict[int, tuple[weakref.ref[AccumState], Tally | torch.Tensor]] = {}
"""By ``id(state)``: the open window's tally, or a closed window's loss; an entry goes
with its state."""


def _forget(key: int) -> Callable[[object], None]:
    def forget(_: object) -> None:
        _BESIDE.pop(key, None)

    return forget


def attach(state: AccumState, value: Tally | torch.Tensor) -> None:
    """Keep ``value`` beside ``state`` (its open window's tally, or its closed window's loss)."""
    key = id(state)
    _BESIDE[key] = (weakref.ref(state, _forget(key)), value)


attach_beside = attach
"""``attach`` by the name the layers above use."""


def _beside(state: AccumState) -> Tally | torch.Tensor | None:
    entry = _BESIDE.get(id(state))
    if entry is None or entry[0]() is not state:
        return None
    return entry[1]


def open_tally(state: AccumState) -> Tally | None:
    """The tally of ``state``'s open window: None while it is empty; a tally with an
    unknown loss when the state's micro-steps were not tallied (a copy of a state).

    ``ConfigError`` for a copy whose window counted items on the device: its count would
    miss them (nothing has run when this is asked)."""
    if state.micro_step == 0 or state.closed:
        return None
    found = _beside(state)
    tally = found if isinstance(found, Tally) else _UNKNOWN
    if tally.counted != state.window_device_counts:
        _refuse_copy(state)
    return tally


def _refuse_copy(state: AccumState) -> None:
    raise ConfigError(
        f"this state's open window counted num_items on the device (a tensor) on "
        f"{state.window_device_counts} of its {state.micro_step} micro-batch(es); those "
        f"counts are kept beside the state object accumulate returned, not in the state, "
        f"and this state is a copy of it (copy.deepcopy, AccumState.from_dict(state.to_dict()), "
        f"attrs.evolve), which lacks them: its window would be divided by too few items. "
        f"Continue from the state accumulate returned; to save a window in progress use "
        f"accumfn.checkpoint.capture (or GradientAccumulator.state_dict), which reads the "
        f"counts into the checkpoint. (Nothing was run.)"
    )


def closed_loss(state: AccumState) -> torch.Tensor | None:
    """The loss of ``state``'s closed window (on the device), if it was tallied."""
    found = _beside(state)
    return found if isinstance(found, torch.Tensor) and state.closed else None


def tally_beside(state: AccumState) -> Tally | torch.Tensor | None:
    """What is kept beside ``state`` (for pickling an object that holds it), or None."""
    return _beside(state)


def restore_tally(state: AccumState, loss: float | None) -> AccumState:
    """``state`` loaded from a checkpoint, with the summed loss of its open window so far
    (``settle``'s) beside it: its item counts are in the state."""
    if loss is not None and state.micro_step and not state.closed:
        attach(state, Tally(float(loss)))
    return state


def carry(old: AccumState, new: AccumState) -> AccumState:
    """``new`` (a copy of ``old`` with other counters) with ``old``'s tally beside it."""
    found = _beside(old)
    if found is not None:
        attach(new, found)
    return new


def settle(state: AccumState) -> tuple[AccumState, float | None]:
    """For a checkpoint: ``state`` with its open window's tensor counts added to its
    ``window_items`` (one read), and the window's summed loss so far as a float (None with
    no window open). The only reads of an open window, at save time."""
    tally = open_tally(state)
    if tally is None:
        return state, None
    value = items_value(tally, state.window_items)
    loss = tally.loss
    if value is not None:
        summed = torch.as_tensor(loss, dtype=torch.float64).to(value.device)
        pair = torch.stack([value.to(torch.float64), summed])
        items, loss_sum = pair.tolist()  # one read for both
        counted = check_counted_items(int(items))
        state = attrs.evolve(state, window_items=counted, window_device_counts=0)
        return state, float(loss_sum)
    return state, float(loss)
