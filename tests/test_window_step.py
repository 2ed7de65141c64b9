"""The window step: one parameter set, all or nothing, every optimizer and gradient kind.

Each test is one setup a user meets (fine-tuning, several optimizers, sparse embeddings,
fp16, schedulers needing arguments, a failing step, ...). Each compares with a hand-written
large-batch loop over the same samples, or asserts a clear error and that nothing changed.
``FIGURES`` collects the differences measured; the session prints them at the end.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import pytest
import torch
from torch import nn
from torch.amp import GradScaler

import accumfn
from accumfn import ConfigError, GradientAccumulator, LossError, StepError

from .support import data, same

MICRO = 4
FIGURES: dict[str, float] = {}


def record(name: str, value: float) -> float:
    FIGURES[name] = max(value, FIGURES.get(name, 0.0))
    return value


def micro_batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(seed, MICRO * count)
    return list(zip(x.split(MICRO), y.split(MICRO), strict=True))


def windows(
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]], size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The large batches: each window's micro-batches joined (the last may be short)."""
    for start in range(0, len(batches), size):
        chunk = batches[start : start + size]
        yield torch.cat([x for x, _ in chunk]), torch.cat([y for _, y in chunk])


def diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a, b, strict=True))


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, y)


def run_functional(
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    model: nn.Module,
    optimizer: Any,
    state: accumfn.AccumState,
    **step: Any,
) -> tuple[accumfn.AccumState, list[float]]:
    """accumfn's loop; returns the final state and each window's reported norm."""
    norms = []
    scaler = step.get("scaler")
    for index, (x, y) in enumerate(batches):
        last = index == len(batches) - 1
        state, stepped = accumfn.accumulate(
            state, loss_of(x, y), model, is_final_batch=last, scaler=scaler
        )
        if stepped:
            state = accumfn.apply_step(state, optimizer, model, **step)
            norms.append(state.last_grad_norm)
    return state, norms


def snapshot(*objects: Any) -> list[Any]:
    """Params, grads and state dicts of models, optimizers, schedulers, scalers, states."""
    shot: list[Any] = []
    for obj in objects:
        if isinstance(obj, nn.Module):
            params = list(obj.parameters())
            shot.append([p.detach().clone() for p in params])
            shot.append([None if p.grad is None else p.grad.clone() for p in params])
        elif isinstance(obj, accumfn.AccumState):
            shot.append(obj.to_dict())
        elif isinstance(obj, GradientAccumulator):
            shot.append(obj.state.to_dict())
        else:
            shot.append(copy.deepcopy(obj.state_dict()))
    return shot


# -- fine-tuning: only the head in the optimizer -----------------------------------------------


def finetune_model(seed: int) -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
    head = nn.Linear(16, 3)
    return nn.Sequential(backbone, head), backbone, head


@pytest.mark.parametrize("with_scaler", [True, False], ids=["GradScaler", "no-scaler"])
def test_finetuning_covers_the_optimizers_params_only(with_scaler: bool) -> None:
    """Backbone trainable but not in the optimizer: its grads stay out of unscale and norm."""
    batches = micro_batches(0, 11)  # windows of 4: 4 | 4 | 3
    model, backbone, head = finetune_model(0)
    ref, ref_backbone, ref_head = finetune_model(0)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref_head.parameters(), lr=0.5)
    make = (lambda: GradScaler("cpu", init_scale=2.0**16)) if with_scaler else (lambda: None)
    scaler, ref_scaler = make(), make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, norms = run_functional(
            batches,
            lambda x, y: mse(model(x), y),
            model,
            opt,
            accumfn.init(4, max_grad_norm=0.05),
            scaler=scaler,
        )
    ref_norms = []
    for x, y in windows(batches, 4):
        ref_opt.zero_grad(set_to_none=True)
        loss = mse(ref(x), y)
        if ref_scaler is None:
            loss.backward()
        else:
            ref_scaler.scale(loss).backward()
            ref_scaler.unscale_(ref_opt)
        ref_norms.append(float(nn.utils.clip_grad_norm_(ref_head.parameters(), 0.05)))
        if ref_scaler is None:
            ref_opt.step()
        else:
            ref_scaler.step(ref_opt)
            ref_scaler.update()
    name = "GradScaler" if with_scaler else "no scaler"
    assert record(f"fine-tuning, {name}: head", diff(head.parameters(), ref_head.parameters()))
    assert diff(head.parameters(), ref_head.parameters()) < 1e-6
    assert record(f"fine-tuning, {name}: norm", max(map(abs, map(float.__sub__, norms, ref_norms))))
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert min(ref_norms) > 0.05  # every window clipped
    assert diff(backbone.parameters(), ref_backbone.parameters()) == 0  # never stepped
    assert all(p.grad is not None for p in backbone.parameters())  # left as they are
    assert all(p.grad is None for p in head.parameters())
    untracked = [w for w in caught if "in no optimizer" in str(w.message)]
    assert len(untracked) == 1  # once, not per window
    message = str(untracked[0].message)
    assert "2 trainable parameter tensor(s)" in message and "0.0.weight" in message
    assert "requires_grad_(False)" in message
    assert state.optimizer_steps == 3


def test_no_warning_when_every_trainable_param_is_covered() -> None:
    model, backbone, head = finetune_model(1)
    backbone.requires_grad_(False)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_functional(
            micro_batches(1, 4),
            lambda x, y: mse(model(x), y),
            model,
            opt,
            accumfn.init(2, max_grad_norm=None),
        )


# -- one optimizer over encoder + decoder, model=decoder -----------------------------------


def encoder_decoder(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh()), nn.Linear(16, 3)


def test_model_argument_does_not_narrow_the_window() -> None:
    batches = micro_batches(2, 10)  # windows of 4: 4 | 4 | 2
    encoder, decoder = encoder_decoder(2)
    ref_encoder, ref_decoder = encoder_decoder(2)
    params = [*encoder.parameters(), *decoder.parameters()]
    ref_params = [*ref_encoder.parameters(), *ref_decoder.parameters()]
    opt = torch.optim.Adam(params, lr=0.01)
    ref_opt = torch.optim.Adam(ref_params, lr=0.01)
    _, norms = run_functional(
        batches,
        lambda x, y: mse(decoder(encoder(x)), y),
        decoder,
        opt,
        accumfn.init(4, max_grad_norm=0.1),
    )
    ref_norms = []
    for x, y in windows(batches, 4):
        ref_opt.zero_grad(set_to_none=True)
        mse(ref_decoder(ref_encoder(x)), y).backward()
        ref_norms.append(float(nn.utils.clip_grad_norm_(ref_params, 0.1)))
        ref_opt.step()
    assert record("encoder + decoder, model=decoder: params", diff(params, ref_params)) < 1e-6
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert min(ref_norms) > 0.1  # every window clipped


def test_skip_nonfinite_sees_a_nan_in_the_encoder() -> None:
    encoder, decoder = encoder_decoder(3)
    params = [*encoder.parameters(), *decoder.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    before = [p.detach().clone() for p in params]
    state = accumfn.init(2, skip_nonfinite=True, max_grad_norm=None)
    for x, y in micro_batches(3, 2):
        poison = encoder[0].weight.sum() * torch.tensor(math.nan)  # NaN grads in the encoder
        state, stepped = accumfn.accumulate(state, mse(decoder(encoder(x)), y) + poison, decoder)
    assert stepped
    state = accumfn.apply_step(state, opt, decoder)
    assert (state.optimizer_steps, state.skipped_steps) == (0, 1)
    assert diff(params, before) == 0
    assert all(p.grad is None for p in params)


# -- several optimizers in one window ----------------------------------------------------------


class TwoHeads(nn.Module):
    """A trunk and two heads, each head with its own loss (two models, two losses)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh())
        self.head_a = nn.Linear(16, 3)
        self.head_b = nn.Linear(16, 3)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return mse(self.head_a(h), y), mse(self.head_b(h), y.flip(1))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        first = [*self.trunk.parameters(), *self.head_a.parameters()]
        return [
            torch.optim.AdamW(first, lr=0.01),
            torch.optim.SGD(self.head_b.parameters(), lr=0.3, momentum=0.9),
        ]


@pytest.mark.parametrize("api", ["functional", "object"])
@pytest.mark.parametrize("with_scaler", [False, True], ids=["no-scaler", "GradScaler"])
def test_several_optimizers_one_window(api: str, with_scaler: bool) -> None:
    """The AMP recipe "multiple models, losses and optimizers", with a short final window."""
    batches = micro_batches(4, 11)  # windows of 4: 4 | 4 | 3
    model, ref = TwoHeads(4), TwoHeads(4)
    opts, ref_opts = model.optimizers(), ref.optimizers()
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in opts]
    ref_scheds = [torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in ref_opts]
    make = (lambda: GradScaler("cpu", init_scale=2.0**12)) if with_scaler else (lambda: None)
    scaler, ref_scaler = make(), make()
    if api == "functional":
        run_functional(
            batches,
            lambda x, y: sum(model.losses(x, y)),  # type: ignore[arg-type, return-value]
            model,
            opts,
            accumfn.init(4, max_grad_norm=0.2),
            scaler=scaler,
            scheduler=scheds,
        )
    else:
        acc = GradientAccumulator(opts, 4, max_grad_norm=0.2, scaler=scaler, scheduler=scheds)
        for index, (x, y) in enumerate(batches):
            loss_a, loss_b = model.losses(x, y)
            acc.accumulate(loss_a + loss_b, model, is_final_batch=index == len(batches) - 1)
        assert acc.stats.optimizer_steps == 3
    for x, y in windows(batches, 4):
        for opt in ref_opts:
            opt.zero_grad(set_to_none=True)
        loss_a, loss_b = ref.losses(x, y)
        if ref_scaler is None:
            (loss_a + loss_b).backward()
        else:  # the recipe: one scaler, unscale_ and step per optimizer, update once
            ref_scaler.scale(loss_a).backward(retain_graph=True)
            ref_scaler.scale(loss_b).backward()
            for opt in ref_opts:
                ref_scaler.unscale_(opt)
        assert nn.utils.clip_grad_norm_(list(ref.parameters()), 0.2) > 0.2  # clipped
        for opt in ref_opts:
            if ref_scaler is None:
                opt.step()
            else:
                ref_scaler.step(opt)
        if ref_scaler is not None:
            ref_scaler.update()
        for sched in ref_scheds:
            sched.step()
    name = f"two optimizers, {'GradScaler' if with_scaler else 'no scaler'}, {api}"
    assert record(name, diff(list(model.parameters()), list(ref.parameters()))) < 1e-6
    assert [s.last_epoch for s in scheds] == [3, 3]
    if scaler is not None and ref_scaler is not None:
        assert scaler.get_scale() == ref_scaler.get_scale()


def test_several_optimizers_skip_the_window_whole() -> None:
    """A non-finite gradient under one optimizer skips every optimizer (and the schedulers)."""
    model = TwoHeads(5)
    opts = model.optimizers()
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1) for o in opts]
    scaler = GradScaler("cpu", init_scale=2.0**12)
    before = [p.detach().clone() for p in model.parameters()]
    state = accumfn.init(2, max_grad_norm=None)
    for x, y in micro_batches(5, 2):
        loss_a, loss_b = model.losses(x, y)
        poison = model.head_b.weight.sum() * torch.tensor(math.inf)
        state, _ = accumfn.accumulate(state, loss_a + loss_b + poison, model, scaler=scaler)
    state = accumfn.apply_step(state, opts, model, scaler=scaler, scheduler=scheds)
    assert (state.optimizer_steps, state.skipped_steps) == (0, 1)
    assert diff(list(model.parameters()), before) == 0
    assert [s.last_epoch for s in scheds] == [0, 0]
    assert scaler.get_scale() == 2.0**11  # backed off once
    assert all(p.grad is None for p in model.parameters())


def test_several_optimizers_checkpoint_mid_window() -> None:
    """capture/restore walk every optimizer's parameters: resuming mid-window is exact."""
    batches = micro_batches(6, 4)
    straight = TwoHeads(6)
    run_functional(
        batches, lambda x, y: sum(straight.losses(x, y)), straight, straight.optimizers(),
        accumfn.init(4, max_grad_norm=None),
    )  # fmt: skip
    model = TwoHeads(6)
    state = accumfn.init(4, max_grad_norm=None)
    for x, y in batches[:2]:
        state, _ = accumfn.accumulate(state, sum(model.losses(x, y)), model)
    saved = accumfn.checkpoint.capture(state, model.optimizers())
    assert len(saved["partial_grads"]) == len(list(model.parameters()))
    resumed = TwoHeads(6)
    opts = resumed.optimizers()
    state = accumfn.checkpoint.restore(saved, accumfn.init(4, max_grad_norm=None), opts)
    for x, y in batches[2:]:
        state, _ = accumfn.accumulate(state, sum(resumed.losses(x, y)), resumed)
    accumfn.apply_step(state, opts, resumed)
    assert diff(list(resumed.parameters()), list(straight.parameters())) == 0


def test_reset_epoch_discards_every_optimizers_window() -> None:
    model = TwoHeads(8)
    model.extra = nn.Linear(16, 3)  # trainable, in no optimizer: left alone
    opts = model.optimizers()
    state = accumfn.init(4, max_grad_norm=None)
    x, y = micro_batches(8, 1)[0]
    loss = sum(model.losses(x, y)) + mse(model.extra(model.trunk(x)), y)
    state, _ = accumfn.accumulate(state, loss, model)
    with pytest.warns(UserWarning, match="discarded an open window of 1"):
        state = accumfn.reset_epoch(state, opts, model)
    assert all(p.grad is None for p in [*model.trunk.parameters(), *model.head_b.parameters()])
    assert all(p.grad is not None for p in model.extra.parameters())
    assert (state.epoch, state.dropped_micro_steps) == (1, 1)


def test_a_parameter_in_two_optimizers_is_refused() -> None:
    model = TwoHeads(7)
    shared = [
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.optim.SGD(model.trunk.parameters()),
    ]
    with pytest.raises(ConfigError, match=r"in optimizer 0 and optimizer 1.*Give each parameter"):
        GradientAccumulator(shared, 2)


# -- all or nothing: what a step needs is checked before anything changes ------------------


def closed_window(seed: int, steps: Any = 2) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A model, its SGD optimizer and a state whose window just closed."""
    torch.manual_seed(seed)
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = accumfn.init(steps, max_grad_norm=None)
    for x, y in micro_batches(seed, state.window):
        state, stepped = accumfn.accumulate(state, mse(model(x), y), model)
    assert stepped
    return model, opt, state


def test_scheduler_needing_arguments_is_refused_before_anything_changes() -> None:
    model, opt, state = closed_window(10)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    pattern = r"ReduceLROnPlateau\.step\(\) needs metrics.*step it yourself.*zero-argument"
    with pytest.raises(ConfigError, match=pattern):
        GradientAccumulator(opt, 2, scheduler=plateau)
    before = snapshot(model, opt, plateau, state)
    with pytest.raises(ConfigError, match=pattern):
        accumfn.apply_step(state, opt, model, scheduler=plateau)
    assert same(before, snapshot(model, opt, plateau, state))
    # the fix: a zero-argument callable, stepped once per applied window
    state = accumfn.apply_step(state, opt, model, scheduler=lambda: plateau.step(1.0))
    assert plateau.last_epoch == 1 and state.optimizer_steps == 1


@pytest.mark.parametrize("bad", ["returns 0", "raises"])
def test_schedule_failing_at_the_next_window_changes_nothing(bad: str) -> None:
    def schedule(step: int) -> int:
        if step == 0:
            return 2
        if bad == "raises":
            raise RuntimeError("schedule table ends at step 0")
        return 0

    error: type[Exception] = ConfigError if bad == "returns 0" else RuntimeError
    match = "returned 0 for effective step 1" if bad == "returns 0" else "table ends"
    model, opt, state = closed_window(11, schedule)
    scaler = GradScaler("cpu", init_scale=4.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    before = snapshot(model, opt, sched, scaler, state)
    with pytest.raises(error, match=match):
        accumfn.apply_step(state, opt, model, scheduler=sched)
    assert same(before, snapshot(model, opt, sched, scaler, state))
    # nothing changed: with the schedule fixed, the same state steps like a large batch
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    fixed = attrs.evolve(state, config=attrs.evolve(state.config, schedule=lambda step: 2))
    fixed = accumfn.apply_step(fixed, opt, model, scheduler=sched)
    ((x, y),) = windows(micro_batches(11, 2), 2)
    mse(ref(x), y).backward()
    ref_opt.step()
    gap = diff(model.parameters(), ref.parameters())
    assert record("schedule fixed after its error: params", gap) < 1e-6
    assert fixed.optimizer_steps == 1

    # object API: checked before the boundary's backward, so not even the gradients change
    acc = GradientAccumulator(opt, schedule, max_grad_norm=None)
    (x, y) = micro_batches(11, 1)[0]
    acc.accumulate(mse(model(x), y), model)
    before = snapshot(model, opt, acc)
    with pytest.raises(error, match=match):
        acc.accumulate(mse(model(x), y), model)
    assert same(before, snapshot(model, opt, acc))


def test_closure_optimizer_is_refused_before_anything_changes() -> None:
    model, _, state = closed_window(12)
    lbfgs = torch.optim.LBFGS(model.parameters())
    pattern = r"LBFGS\.step\(\) needs closure.*optimizer that steps without a closure"
    with pytest.raises(ConfigError, match=pattern):
        GradientAccumulator(lbfgs, 2)
    before = snapshot(model, lbfgs, state)
    with pytest.raises(ConfigError, match=pattern):
        accumfn.apply_step(state, lbfgs, model)
    assert same(before, snapshot(model, lbfgs, state))


# -- a step that still fails: the accumulator continues -----------------------------------


class FailingSGD(torch.optim.SGD):
    """SGD whose step raises on the calls listed (an optimizer bug, an out-of-memory)."""

    def __init__(self, params: Any, fail_on: set[int]) -> None:
        super().__init__(params, lr=0.2)
        self.calls = 0
        self.fail_on = fail_on

    @torch.no_grad()  # type: ignore[misc]
    def step(self, closure: Any = None) -> Any:
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("CUDA out of memory (simulated)")
        return super().step(closure)


def test_optimizer_failing_in_the_step_skips_the_window_and_training_continues() -> None:
    batches = micro_batches(13, 8)  # 4 windows of 2; the second one's step fails
    torch.manual_seed(13)
    model = nn.Linear(6, 3)
    ref = copy.deepcopy(model)
    opt = FailingSGD(model.parameters(), fail_on={2})
    scaler = GradScaler("cpu", init_scale=2.0**10)
    acc = GradientAccumulator(opt, 2, max_grad_norm=0.5, scaler=scaler)
    failures = []
    for x, y in batches:
        try:
            acc.accumulate(mse(model(x), y), model)
        except StepError as exc:
            failures.append(exc)
    assert len(failures) == 1
    exc = failures[0]
    assert re.search(r"failed in optimizer 0 \(FailingSGD\) step\(\): RuntimeError", str(exc))
    assert "closed as skipped" in str(exc) and ".state" in str(exc)
    assert isinstance(exc.__cause__, RuntimeError) and not exc.applied
    assert (acc.stats.optimizer_steps, acc.stats.skipped_steps) == (3, 1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    ref_scaler = GradScaler("cpu", init_scale=2.0**10)
    for index, (x, y) in enumerate(windows(batches, 2)):
        ref_opt.zero_grad(set_to_none=True)
        ref_scaler.scale(mse(ref(x), y)).backward()
        ref_scaler.unscale_(ref_opt)
        nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        if index != 1:  # the failed window is dropped whole
            ref_scaler.step(ref_opt)
        ref_scaler.update()
    gap = diff(model.parameters(), ref.parameters())
    assert record("optimizer failing in a step, then 2 more windows: params", gap) < 1e-6


def test_scheduler_failing_in_the_step_counts_the_window_as_applied() -> None:
    """OneCycleLR stepped past total_steps raises after the optimizer stepped."""
    model, opt, state = closed_window(14, 1)
    ref = copy.deepcopy(model)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=1)
    state = accumfn.apply_step(state, opt, model, scheduler=one_cycle)
    x, y = micro_batches(14, 2)[1]
    state, _ = accumfn.accumulate(state, mse(model(x), y), model)
    pattern = r"failed in scheduler 0 step\(\).*closed as applied"
    with pytest.raises(StepError, match=pattern) as info:
        accumfn.apply_step(state, opt, model, scheduler=one_cycle)
    assert isinstance(info.value.__cause__, ValueError)
    resumed = info.value.state
    assert info.value.applied and (resumed.optimizer_steps, resumed.closed) == (2, False)
    assert all(p.grad is None for p in model.parameters())
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_cycle = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=1)
    for index, (x, y) in enumerate([micro_batches(14, 1)[0], micro_batches(14, 2)[1]]):
        ref_opt.zero_grad(set_to_none=True)
        mse(ref(x), y).backward()
        ref_opt.step()
        if index == 0:
            ref_cycle.step()
    gap = diff(model.parameters(), ref.parameters())
    assert record("scheduler failing in a step: params", gap) < 1e-6
    # the state it gave accumulates on
    accumfn.accumulate(resumed, mse(model(x), y), model)


# -- one GradScaler, two accumulators ---------------------------------------------------------


def test_two_accumulators_sharing_a_grad_scaler_are_refused() -> None:
    gen, disc = TwoHeads(15), TwoHeads(16)
    opt_g = torch.optim.SGD(gen.parameters(), lr=0.1)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.1)
    scaler = GradScaler("cpu")
    pattern = r"already serves another optimizer set \(SGD\).*optimizer=\[opt_a, opt_b\]"
    GradientAccumulator(opt_g, 2, scaler=scaler)
    with pytest.raises(ConfigError, match=pattern):
        GradientAccumulator(opt_d, 2, scaler=scaler)
    # functional: refused at the second set's step, before it changes anything
    state = accumfn.init(1, max_grad_norm=None)
    x, y = micro_batches(15, 1)[0]
    state, _ = accumfn.accumulate(state, sum(disc.losses(x, y)), disc, scaler=scaler)
    before = snapshot(disc, opt_d, scaler, state)
    with pytest.raises(ConfigError, match=pattern):
        accumfn.apply_step(state, opt_d, disc, scaler=scaler)
    assert same(before, snapshot(disc, opt_d, scaler, state))
    # the sequence form is one set: accepted
    GradientAccumulator([opt_g, opt_d], 2, scaler=GradScaler("cpu"))


# -- gradient kinds ---------------------------------------------------------------------------


class SparseModel(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embedding = nn.Embedding(20, 6, sparse=True)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(tokens).mean(1))

    def optimizers(self, kind: str) -> list[torch.optim.Optimizer]:
        if kind == "SGD":
            return [torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)]
        return [
            torch.optim.SparseAdam(self.embedding.parameters(), lr=0.05),
            torch.optim.Adam(self.head.parameters(), lr=0.05),
        ]


def token_batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 8, (MICRO * count, 5), generator=g)  # repeated tokens
    return list(zip(tokens.split(MICRO), data(seed, MICRO * count)[1].split(MICRO), strict=True))


def hand_clip_(params: Sequence[torch.Tensor], max_norm: float | None) -> float:
    """Clip by the 2-norm over dense grads and the coalesced values of sparse ones."""
    grads = [p.grad for p in params if p.grad is not None]
    squares = [(g.coalesce().values() if g.is_sparse else g).pow(2).sum() for g in grads]
    norm = torch.stack(squares).sum().sqrt()
    if max_norm is not None:
        coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coefficient)
    return float(norm)


@pytest.mark.parametrize("max_norm", [None, 0.05])
@pytest.mark.parametrize("kind", ["SGD", "SparseAdam+Adam"])
def test_sparse_gradients_match_large_batch(kind: str, max_norm: float | None) -> None:
    batches = token_batches(17, 7)  # windows of 3: 3 | 3 | 1 (rescaled by 3)
    model, ref = SparseModel(17), SparseModel(17)
    opts, ref_opts = model.optimizers(kind), ref.optimizers(kind)
    _, norms = run_functional(
        batches, lambda x, y: mse(model(x), y), model, opts, accumfn.init(3, max_grad_norm=max_norm)
    )
    ref_norms = []
    for x, y in windows(batches, 3):
        for opt in ref_opts:
            opt.zero_grad(set_to_none=True)
        mse(ref(x), y).backward()
        ref_norms.append(hand_clip_(list(ref.parameters()), max_norm))
        for opt in ref_opts:
            opt.step()
    name = f"sparse, {kind}, max_grad_norm={max_norm}: params"
    assert record(name, diff(list(model.parameters()), list(ref.parameters()))) < 1e-6
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert max_norm is None or min(ref_norms) > max_norm  # every window clipped


def test_sparse_gradients_skip_a_nonfinite_window() -> None:
    model = SparseModel(18)
    opts = model.optimizers("SparseAdam+Adam")
    before = [p.detach().clone() for p in model.parameters()]
    state = accumfn.init(2, skip_nonfinite=True, max_grad_norm=None)
    for index, (x, y) in enumerate(token_batches(18, 2)):
        scale = math.nan if index == 1 else 1.0  # NaN in the sparse gradient too
        state, _ = accumfn.accumulate(state, mse(model(x), y) * scale, model)
    state = accumfn.apply_step(state, opts, model)
    assert (state.optimizer_steps, state.skipped_steps) == (0, 1)
    assert diff(list(model.parameters()), before) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_rescale_beyond_fp16_range(dtype: torch.dtype) -> None:
    """A window of 2**17 closed after one micro-step: rescale by 131072 (> 65504)."""
    torch.manual_seed(19)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    ref = copy.deepcopy(model)
    x, y = (t.to(dtype) for t in data(19, MICRO))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=1e-4)
    state, _ = accumfn.accumulate(
        accumfn.init(2**17, max_grad_norm=None), mse(model(x), y) * 1000, model, is_final_batch=True
    )
    assert state.grad_scale == 2.0**17
    accumfn.apply_step(state, opt, model)
    (mse(ref(x), y) * 1000).backward()
    ref_opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    name = f"{str(dtype).removeprefix('torch.')} grads, rescale by 2**17: params"
    assert record(name, diff(list(model.parameters()), list(ref.parameters()))) == 0


def test_low_precision_rescale_rounds_once() -> None:
    grad = torch.linspace(-3, 3, 101, dtype=torch.float16)
    param = nn.Parameter(torch.zeros(101, dtype=torch.float16))
    param.grad = grad.clone()
    from accumfn.grads import scale_grads_

    scale_grads_([param], 1 / 3)
    assert torch.equal(param.grad, (grad.float() * (1 / 3)).half())


def test_fp16_params_with_a_grad_scaler_get_the_hint_before_anything_changes() -> None:
    torch.manual_seed(20)
    model = TwoHeads(20)
    model.head_b.half()  # the second optimizer's parameters are fp16
    opts = model.optimizers()
    scaler = GradScaler("cpu")
    pattern = r"Attempting to unscale FP16 gradients.*torch\.autocast.*drop the GradScaler"
    with pytest.raises(ConfigError, match=pattern):
        GradientAccumulator(opts, 1, scaler=scaler)
    x, y = micro_batches(20, 1)[0]
    h = model.trunk(x)
    loss = mse(model.head_a(h), y) + mse(model.head_b(h.half()).float(), y)
    state, _ = accumfn.accumulate(accumfn.init(1, max_grad_norm=None), loss, model, scaler=scaler)
    before = snapshot(model, *opts, scaler, state)
    with pytest.raises(ConfigError, match=pattern):
        accumfn.apply_step(state, opts, model, scaler=scaler)
    assert same(before, snapshot(model, *opts, scaler, state))  # optimizer 0 not unscaled


# -- a backward the user already ran -------------------------------------------------------


@pytest.mark.parametrize("api", ["functional", "object"])
def test_backward_already_run_gets_a_loss_error(api: str) -> None:
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = GradientAccumulator(opt, 2)
    state = accumfn.init(2, max_grad_norm=None)
    x, y = micro_batches(21, 1)[0]
    loss = mse(model(x), y)
    loss.backward()
    before = snapshot(model, opt, state, acc)
    pattern = r"already used by a backward pass: accumulate runs backward itself.*remove your"
    with pytest.raises(LossError, match=pattern):
        if api == "functional":
            accumfn.accumulate(state, loss, model)
        else:
            acc.accumulate(loss, model)
    assert same(before, snapshot(model, opt, state, acc))


def test_second_optimizer_failing_names_the_one_that_stepped_and_the_window_is_skipped() -> None:
    torch.manual_seed(15)
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = FailingSGD(model[1].parameters(), fail_on={1})
    state = accumfn.init(2, max_grad_norm=None)
    for x, y in micro_batches(15, 2):
        state, stepped = accumfn.accumulate(state, mse(model(x), y), model)
    assert stepped
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(StepError) as info:
        accumfn.step_window(state, [first, second], model)
    message = str(info.value)
    assert "failed in optimizer 1 (FailingSGD) step()" in message
    assert "closed as skipped" in message and "Optimizer(s) [0] had stepped" in message
    resumed = info.value.state
    assert not info.value.applied and (resumed.skipped_steps, resumed.closed) == (1, False)
    after = list(model.parameters())
    moved = [not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True)]
    assert moved == [True, True, False, False]  # the first optimizer's parameters only
    assert all(p.grad is None for p in model.parameters())
