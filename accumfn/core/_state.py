"""The frozen records of the core: configuration, state, and the plan of a micro-step."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any

import attrs

from ..errors import ConfigError
from ._checks import check_count, check_positive_float
from ._schedule import CallerClosed, Schedule, schedule_from

__all__ = [
    "DEFAULT_MAX_GRAD_NORM",
    "AccumConfig",
    "AccumState",
    "MicroPlan",
    "Normalization",
    "window_progress",
]

DEFAULT_MAX_GRAD_NORM = 1.0
"""The clipping every entry point applies unless told otherwise (``max_grad_norm=None``: none).

``accumfn.init``, ``GradientAccumulator``, ``AccumulationConfig`` and so ``from_config`` and
``accumfn check`` share it; docs/config.md ("Clipping default") gives the peers' defaults.
"""


class Normalization(enum.Enum):
    """How the gradients of a window are normalized."""

    MEAN = "mean"
    """Each loss is a mean; the update is the mean over the window's micro-batches."""
    ITEMS = "items"
    """Each loss is a sum over ``num_items`` items; the update is the mean over all items."""


def _max_grad_norm(value: object) -> float | None:
    return check_positive_float("max_grad_norm", value, allow_none=True)


def _batch_size(value: object) -> int:
    return check_count("batch_size", value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}.")
    return value


def _skip_nonfinite(value: object) -> bool:
    return _flag("skip_nonfinite", value)


def _sync_every_micro_step(value: object) -> bool:
    return _flag("sync_every_micro_step", value)


ACCUM_DTYPES = ("float32", "float64")


def _accum_dtype(value: object) -> str | None:
    """None, or a dtype name ("float32", or ``torch.float32``: read by name, no torch here)."""
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in ACCUM_DTYPES:
        raise ConfigError(
            f"accum_dtype must be torch.float32, torch.float64 or None, got {value!r}; pass "
            f"torch.float32 to accumulate bf16/fp16 gradients in fp32, or None to accumulate "
            f"in the parameters' dtype."
        )
    return name


@attrs.frozen
class AccumConfig:
    """What the user asked for. Plain values only, except a callable schedule."""

    schedule: Schedule = attrs.field(converter=schedule_from)
    max_grad_norm: float | None = attrs.field(
        default=DEFAULT_MAX_GRAD_NORM, converter=_max_grad_norm
    )
    batch_size: int = attrs.field(default=1, converter=_batch_size)
    skip_nonfinite: bool = attrs.field(default=False, converter=_skip_nonfinite)
    sync_every_micro_step: bool = attrs.field(default=False, converter=_sync_every_micro_step)
    accum_dtype: str | None = attrs.field(default=None, converter=_accum_dtype)
    """Name of the dtype the window's gradients are summed in ("float32"), or None."""

    def __attrs_post_init__(self) -> None:
        if self.sync_every_micro_step and isinstance(self.schedule, CallerClosed):
            raise ConfigError(
                "steps=None (windows the caller closes) and sync_every_micro_step=True do not "
                "combine: every backward would all-reduce, so ranks with different numbers of "
                "micro-batches in a window would wait on each other's collectives. Drop "
                "sync_every_micro_step: a caller-closed window is reduced once, when it closes."
            )
        if self.accum_dtype is not None and self.sync_every_micro_step:
            raise ConfigError(
                "accum_dtype and sync_every_micro_step=True do not combine: with accum_dtype "
                "the window's gradients are summed in a wide buffer and reduced once, at the "
                "boundary. Drop one of them."
            )


def _optional_flag(
    instance: object, attribute: attrs.Attribute[bool | None], value: object
) -> None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(
            f"AccumState.{attribute.name} must be True, False or None, got {value!r}."
        )


def _non_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"AccumState.{attribute.name} must be an int >= 0, got {value!r}.")


@attrs.frozen
class AccumState:
    """Everything needed to decide the next micro-step, and to resume at any micro-step.

    Immutable: the step functions return a new state. ``to_dict``/``from_dict`` give a
    plain, JSON-able dict.
    """

    config: AccumConfig
    window: int = attrs.field(validator=_non_negative)
    """Size of the open window (micro-batches), fixed when the window opened; 0 when the
    caller closes it (``steps=None``)."""
    micro_step: int = attrs.field(default=0, validator=_non_negative)
    """Micro-batches accumulated in the open (or just closed) window."""
    window_norm: Normalization | None = None
    """Normalization of the open window; None while it is empty."""
    window_items: int = attrs.field(default=0, validator=_non_negative)
    """Items (``num_items``) this process accumulated in the open window."""
    closed: bool = False
    """True between the boundary micro-step and ``apply_step``."""
    grad_scale: float = 1.0
    """Factor ``apply_step`` multiplies the closed window's gradients by (0: a window with
    no items on any rank, which applies nothing and counts as skipped)."""
    epoch: int = attrs.field(default=0, validator=_non_negative)
    total_micro_steps: int = attrs.field(default=0, validator=_non_negative)
    optimizer_steps: int = attrs.field(default=0, validator=_non_negative)
    """Windows whose update was applied."""
    skipped_steps: int = attrs.field(default=0, validator=_non_negative)
    """Windows whose update was skipped (non-finite gradients)."""
    dropped_micro_steps: int = attrs.field(default=0, validator=_non_negative)
    """Micro-batches discarded by ``reset_epoch`` with a window open."""
    last_grad_norm: float | None = None
    """Pre-clip gradient norm of the last closed window, when it was read."""
    window_scaled: bool | None = attrs.field(default=None, validator=_optional_flag)
    """Whether the open window's losses were scaled by a (enabled) GradScaler, fixed by its
    first micro-step: the step must get the same scaler. None while the window is empty,
    and for a state saved before this was recorded (then nothing is checked)."""
    window_device_counts: int = attrs.field(default=0, validator=_non_negative)
    """Micro-steps of the open window whose ``num_items`` was a tensor counted on the
    device: their counts are kept by the shell beside the state ``accumulate`` returned,
    not in ``window_items``, so a copy of this state lacks them (the shell refuses one).
    0 in a checkpoint, which reads them into ``window_items``."""

    def __attrs_post_init__(self) -> None:
        if self.caller_closed:
            if self.window != 0:
                raise ConfigError(
                    f"AccumState.window must be 0 when the caller closes windows (steps=None), "
                    f"got {self.window}."
                )
        elif self.window < 1:
            raise ConfigError(f"AccumState.window must be >= 1, got {self.window}.")
        elif self.micro_step > self.window:
            raise ConfigError(
                f"AccumState.micro_step ({self.micro_step}) exceeds the window ({self.window})."
            )
        if self.closed and self.micro_step == 0:
            raise ConfigError("AccumState is closed but its window holds no micro-step.")
        if not (math.isfinite(self.grad_scale) and self.grad_scale >= 0):
            raise ConfigError(
                f"AccumState.grad_scale must be a finite number >= 0, got {self.grad_scale}."
            )
        if self.grad_scale == 0 and not (self.closed and self.window_norm is Normalization.ITEMS):
            raise ConfigError(
                "AccumState.grad_scale is 0 only for a closed item-mode window without items."
            )
        if self.micro_step == 0 and self.window_scaled is not None:
            raise ConfigError("AccumState.window_scaled must be None while the window is empty.")
        if self.window_device_counts > self.micro_step or (
            self.window_device_counts and self.window_norm is not Normalization.ITEMS
        ):
            raise ConfigError(
                f"AccumState.window_device_counts ({self.window_device_counts}) must be at "
                f"most the window's micro-steps ({self.micro_step}), and 0 outside item mode."
            )
        if (self.window_norm is None) != (self.micro_step == 0):
            raise ConfigError(
                "AccumState.window_norm must be set exactly when the window holds micro-steps."
            )

    @property
    def effective_step(self) -> int:
        """Windows closed (applied or skipped). Read while a window is open, it is that
        window's step, from 0: the step its metrics are logged at."""
        return self.optimizer_steps + self.skipped_steps

    @property
    def is_accumulating(self) -> bool:
        """True while a window holds gradients that have not been applied yet."""
        return self.micro_step > 0

    @property
    def caller_closed(self) -> bool:
        """True when windows close only when the caller says so (``steps=None``)."""
        return isinstance(self.config.schedule, CallerClosed)

    @property
    def effective_batch_size(self) -> int:
        """Micro-batch size times the current window, per process.

        ConfigError when the caller closes windows (``steps=None``): there is no planned
        window; the effective batch is the micro-batch size times the micro-batches each
        window is closed after.
        """
        if self.caller_closed:
            raise ConfigError(
                "steps=None: the caller closes each window, so there is no planned window and "
                "no fixed effective batch size: it is batch_size times the micro-batches each "
                "window is closed after (state.micro_step while the window is open)."
            )
        return self.config.batch_size * self.window

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict (loadable with ``torch.load(weights_only=True)``)."""
        from ._serialize import state_to_dict

        return state_to_dict(self)

    @classmethod
    def from_dict(cls, data: object, *, schedule: object = None) -> AccumState:
        """Rebuild a state from ``to_dict`` output; strict about keys, types and format.

        ``schedule`` must be given again when the state was saved with a callable schedule.
        """
        from ._serialize import state_from_dict

        return state_from_dict(data, schedule=schedule)


def window_progress(state: AccumState) -> str:
    """``"3 of 4 micro-steps"`` (or ``"3 micro-steps of a window the caller closes"``), for
    messages."""
    if state.caller_closed:
        return f"{state.micro_step} micro-steps of a window the caller closes"
    return f"{state.micro_step} of {state.window} micro-steps"


@attrs.frozen
class MicroPlan:
    """What the shell must do for one micro-step, decided by the core."""

    loss_divisor: int
    """Divide the loss by this before backward (the window size in mean mode, else 1; 1 for
    a window the caller closes, which is rescaled at the close)."""
    boundary: bool
    """This micro-step closes the window."""
    reduce_grads: bool
    """Gradients should be reduced across processes in this backward."""


class _DraftState(AccumState):
    """An ``AccumState`` whose fields can be assigned: a new state is made as one, filled
    with plain slot stores, then given its real class (it adds no slots, so the layouts
    are the same and Python allows the ``__class__`` assignment). ``attrs.evolve`` runs
    every validator and ``__attrs_post_init__`` again and sets each field of a frozen
    class through ``object.__setattr__``: about 7 us per state, against under 1 us."""

    __slots__ = ()
    # Both must be object's for Python to store into the slots directly.
    __setattr__ = object.__setattr__
    __delattr__ = object.__delattr__


_FIELDS = tuple(field.name for field in attrs.fields(AccumState))


def state_evolver(*changed: str) -> Callable[..., AccumState]:
    """``evolve(state, *values)``: a copy of ``state`` whose fields ``changed`` are set to
    ``values`` (in that order), built without validation. Only for the core's transitions,
    whose results keep the invariants (``property_tests/test_core_machine.py`` re-validates
    every state they produce); user-given values are validated at the edges: ``init``,
    ``AccumState(...)``, ``from_dict`` and the transitions' arguments.

    Generated from the fields, as attrs generates ``__init__``, so a field added later is
    copied too.
    """
    unknown = set(changed) - set(_FIELDS)
    if unknown:
        raise TypeError(f"AccumState has no field(s) {sorted(unknown)}")
    body = "".join(
        f"    new.{name} = {name if name in changed else 'state.' + name}\n" for name in _FIELDS
    )
    # The helpers are bound as defaults: read from the frame, not from a globals dict.
    source = (
        f"def evolve(state, {', '.join(changed)}, _new=_new, _draft=_draft, _cls=_cls):\n"
        f"    new = _new(_draft)\n{body}    new.__class__ = _cls\n    return new\n"
    )
    scope: dict[str, Any] = {"_new": object.__new__, "_draft": _DraftState, "_cls": AccumState}
    exec(compile(source, f"<AccumState evolver of {', '.join(changed)}>", "exec"), scope)
    evolve: Callable[..., AccumState] = scope["evolve"]
    return evolve


_EVOLVERS: dict[tuple[str, ...], Callable[..., AccumState]] = {}


def evolve_state(state: AccumState, **changes: Any) -> AccumState:
    """``attrs.evolve(state, **changes)`` without validation (see ``state_evolver``)."""
    key = tuple(changes)
    evolve = _EVOLVERS.get(key)
    if evolve is None:
        evolve = _EVOLVERS[key] = state_evolver(*key)
    return evolve(state, *changes.values())


_PLANS: dict[int, MicroPlan] = {}
"""By ``4 * loss_divisor + 2 * boundary + reduce_grads``: an int key hashes at no cost."""


def micro_plan(loss_divisor: int, boundary: bool, reduce_grads: bool) -> MicroPlan:
    """The (frozen, so shared) ``MicroPlan`` with these values; built once per combination."""
    key = 4 * loss_divisor + 2 * boundary + reduce_grads
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = MicroPlan(loss_divisor, boundary, reduce_grads)
    return plan
