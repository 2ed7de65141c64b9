"""Stateful property test: the pure core against a tiny model of the rules."""

from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from accumfn import core
from accumfn.errors import CallOrderError, ConfigError

TABLE = st.lists(st.integers(1, 6), min_size=1, max_size=6)
ON_DEVICE_ITEMS = 7
"""Items of each micro-batch counted on the device (the shell adds them at the close)."""


class CoreMachine(RuleBasedStateMachine):
    """Model: window sizes come from the schedule when a window opens; counters add up."""

    @initialize(
        kind=st.sampled_from(["constant", "epochs", "callable", "caller"]),
        sizes=TABLE,
        every=st.booleans(),
    )
    def start(self, kind: str, sizes: list[int], every: bool) -> None:
        self.sizes = sizes
        self.fn = None
        if kind == "constant":
            spec: object = sizes[0]
        elif kind == "epochs":
            spec = {2 * i: size for i, size in enumerate(sizes)}
        elif kind == "callable":
            self.fn = self._by_step
            spec = self.fn
        else:
            spec = None  # the caller closes every window (is_final_batch=True)
            every = False  # (refused with steps=None)
        self.kind = kind
        self.every = every
        self.state = core.init(spec, sync_every_micro_step=every)  # type: ignore[arg-type]
        self.epoch = 0
        self.micro = 0
        self.total = 0
        self.applied = 0
        self.skipped = 0
        self.dropped = 0
        self.items = 0
        self.device = 0  # micro-steps of the window whose count the shell keeps
        self.mode: str | None = None
        self.scaled: bool | None = None  # whether the window's losses went through a GradScaler
        self.closed = False
        self.window = self._expected_window()

    def _by_step(self, step: int) -> int:
        return self.sizes[step % len(self.sizes)]

    def _expected_window(self) -> int:
        if self.kind == "caller":
            return 0  # no planned size: only is_final_batch closes the window
        if self.kind == "constant":
            return self.sizes[0]
        if self.kind == "epochs":
            return self.sizes[min(self.epoch // 2, len(self.sizes) - 1)]
        return self._by_step(self.applied + self.skipped)

    @rule(
        final=st.booleans(),
        items=st.one_of(st.none(), st.integers(1, 50), st.just("device")),
        scaled=st.sampled_from([False, False, False, True]),
    )
    def micro_step(self, final: bool, items: int | str | None, scaled: bool) -> None:
        mode = "mean" if items is None else "items"
        before = self.state
        on_device = items == "device"
        given = core.ON_DEVICE if on_device else items
        step = {"is_final_batch": final, "num_items": given, "scaled": scaled}
        if self.closed:
            try:
                core.micro_step(self.state, **step)  # type: ignore[arg-type]
            except CallOrderError:
                assert self.state == before
                return
            raise AssertionError("micro_step on a closed window must raise")
        if (self.mode is not None and mode != self.mode) or (
            self.scaled is not None and scaled != self.scaled
        ):
            try:
                core.micro_step(self.state, **step)  # type: ignore[arg-type]
            except ConfigError:
                assert self.state == before
                return
            raise AssertionError("mixing modes or loss scaling in a window must raise")
        synced_forward = core.sync_next_forward(self.state)
        self.state, plan = core.micro_step(self.state, **step)  # type: ignore[arg-type]
        self.micro += 1
        self.total += 1
        self.items += items if isinstance(items, int) else 0
        self.device += on_device
        self.mode = mode
        self.scaled = scaled
        boundary = final or self.micro == self.window
        assert plan.boundary == boundary
        assert plan.reduce_grads == (boundary or self.every)
        assert synced_forward == (self.every or self.micro == self.window)
        assert plan.loss_divisor == ((self.window or 1) if mode == "mean" else 1)
        if boundary:
            counted = self.items + ON_DEVICE_ITEMS * self.device  # as the shell reads it
            self.state = core.close_window(self.state, global_items=counted)
            expected = (self.window or 1) / self.micro if mode == "mean" else 1 / counted
            assert self.state.grad_scale == expected
            self.closed = True

    @rule(applied=st.booleans())
    def apply(self, applied: bool) -> None:
        if not self.closed:
            try:
                core.finish_step(self.state, applied=applied)
            except CallOrderError:
                return
            raise AssertionError("finish_step without a closed window must raise")
        for step_scaled in (False, True):  # the step must (un)scale as the window did
            if step_scaled == self.scaled:
                core.check_step_scaler(self.state, step_scaled)
            else:
                with pytest.raises(ConfigError, match="GradScaler"):
                    core.check_step_scaler(self.state, step_scaled)
        self.state = core.finish_step(self.state, applied=applied)
        self.applied += applied
        self.skipped += not applied
        self.micro = self.items = self.device = 0
        self.mode = None
        self.scaled = None
        self.closed = False
        self.window = self._expected_window()

    @rule()
    def new_epoch(self) -> None:
        if self.closed:
            try:
                core.start_epoch(self.state)
            except CallOrderError:
                return
            raise AssertionError("start_epoch on a closed window must raise")
        self.state, dropped = core.start_epoch(self.state)
        assert dropped == self.micro
        self.dropped += dropped
        self.epoch += 1
        self.micro = self.items = self.device = 0
        self.mode = None
        self.scaled = None
        self.window = self._expected_window()

    @invariant()
    def counters_match_the_model(self) -> None:
        s = self.state
        assert (s.window, s.micro_step, s.epoch, s.closed) == (
            self.window,
            self.micro,
            self.epoch,
            self.closed,
        )
        assert (s.total_micro_steps, s.optimizer_steps, s.skipped_steps) == (
            self.total,
            self.applied,
            self.skipped,
        )
        assert s.effective_step == self.applied + self.skipped
        assert s.dropped_micro_steps == self.dropped and s.window_items == self.items
        assert s.is_accumulating == (self.micro > 0)
        assert s.window_scaled is self.scaled
        assert s.window_device_counts == self.device

    @invariant()
    def every_state_passes_the_validators(self) -> None:
        # The transitions build states without validation; attrs.evolve runs every
        # validator and __attrs_post_init__ on the same values.
        assert attrs.evolve(self.state) == self.state

    @invariant()
    def round_trip_gives_an_identical_state(self) -> None:
        data = json.loads(json.dumps(self.state.to_dict()))
        assert core.AccumState.from_dict(data, schedule=self.fn) == self.state


CoreMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
TestCoreMachine = CoreMachine.TestCase
