"""An open window's guard: nothing but accumfn touches its gradients until its step.

Users bring the loop they had: an ``optimizer.zero_grad()`` or ``optimizer.step()`` left
inside the window, optimizers stepped inside backward (post-accumulate-grad hooks,
torchtune's "optimizer in backward"), and a window never applied at the end. One
``WindowGuard`` per model (the model given to ``accumulate``) catches them:

- After accumfn's backward it records, for the smallest trainable parameter of each of the
  window's optimizers (of the model, until a step names them), its ``.grad`` tensor and that
  tensor's version counter. The next ``accumulate`` or ``flush`` compares them before
  anything runs: a gradient set to None, replaced or written in place in between raises
  ``CallOrderError`` naming the line to remove. With ``accum_dtype`` that parameter keeps a
  zeroed ``.grad`` between micro-steps (the others are cleared into the wide buffers), so
  the same mistake is seen the same way. FSDP2 keeps an open window's gradients to itself:
  there the check starts from the optimizers' (sharded) parameters.
- A step pre-hook on each of the window's optimizers refuses ``optimizer.step()`` while the
  window holds micro-batches (accumfn's own step comes once the window closed).
- Around backward, when the window's parameters carry post-accumulate-grad hooks, a global
  step pre-hook refuses any optimizer stepped inside it, and the first such backward is
  undone (its gradients put back), so the refusal changes nothing.
- A window still holding micro-batches when the program ends or the model (or the
  ``GradientAccumulator``) is garbage-collected is reported once
  (``UnappliedWindowWarning``), unless a checkpoint of it was taken.

Cost on a micro-step: a lookup of the model's guard, and a few attribute reads and writes
per optimizer; no host-device sync.

Legitimate writers set the guard themselves: accumfn's backward (``note``), the window's
close and step (``closed``, ``applied``), ``reset_epoch`` (``dropped``), a checkpoint
(``saved``, ``restored``). DDP's one-time bucket rebuild (``gradient_as_bucket_view``),
which moves the gradients into its buckets at the forward after its first synced
backward, is recognised and let through.
"""

from __future__ import annotations

import atexit
import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .. import parallel as distributed
from ..core import AccumState
from ..errors import CallOrderError, ConfigError, UnappliedWindowWarning
from ..grads import optimizer_params
from ._foreign import check_foreign_model, check_foreign_optimizer

__all__ = [
    "WindowGuard",
    "all_guards",
    "existing_guard",
    "guard_for",
    "guards_of",
    "report_dropped",
]

_Record = tuple[tuple[torch.Tensor, torch.Tensor | None, int], ...]


def _smallest(params: Iterable[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The smallest trainable parameter (cheap to keep a gradient of), as a 0- or 1-tuple."""
    best: torch.Tensor | None = None
    for param in params:
        if param.requires_grad and (best is None or param.numel() < best.numel()):
            best = param
    return () if best is None else (best,)


def _has_post_hooks(params: Iterable[torch.Tensor]) -> bool:
    """Whether any parameter has a post-accumulate-grad hook (``register_post_accumulate_
    grad_hook``): the place an optimizer stepped inside backward lives."""
    return any(getattr(param, "_post_accumulate_grad_hooks", None) for param in params)


class _SteppedInBackward(Exception):
    """Raised by the global step pre-hook inside a guarded backward."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(type(optimizer).__name__)
        self.optimizer = optimizer


def _refuse_in_backward(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    raise _SteppedInBackward(optimizer)


def _in_backward_error(optimizer: object, undone: bool) -> ConfigError:
    after = (
        "Nothing changed: the step did not run and this micro-batch's gradients were taken back."
        if undone
        else "The step did not run."
    )
    return ConfigError(
        f"an optimizer ({type(optimizer).__name__}) was stepped inside accumfn's backward, "
        f"from a hook on a parameter (register_post_accumulate_grad_hook: 'optimizer in "
        f"backward', as torchtune's optimizer_in_bwd): it would step every micro-batch with "
        f"that micro-batch's gradient alone, not once per window with the window's sum "
        f"(torchtune refuses gradient accumulation there too). Remove those hooks (keep the "
        f"handles register_post_accumulate_grad_hook returned and call .remove()) and pass "
        f"the optimizers to accumfn, which steps them once per window; or train without "
        f"accumulation. {after}"
    )


class _StepHook:
    """A step pre-hook on one optimizer: refuses a step while its window is open."""

    __slots__ = ("guard",)

    def __init__(self) -> None:
        self.guard: weakref.ref[WindowGuard] | None = None

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        guard = None if self.guard is None else self.guard()
        if guard is None:
            return
        if guard.in_backward:
            raise _in_backward_error(optimizer, undone=False)
        if guard.open and guard.intact():
            raise CallOrderError(guard.step_message(optimizer))


_HOOKS: weakref.WeakKeyDictionary[torch.optim.Optimizer, _StepHook] = weakref.WeakKeyDictionary()
"""The step pre-hook of each optimizer a window covers (registered once)."""


def _hook_target(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer | None:
    """The optimizer whose step runs the hooks: itself, or the one a wrapper that does
    not initialise ``Optimizer`` holds (Accelerate's ``AcceleratedOptimizer``)."""
    if hasattr(optimizer, "_optimizer_step_pre_hooks"):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "_optimizer_step_pre_hooks"):
        return inner
    return None


class WindowGuard:
    """The guard of one model's open window (see the module's doc)."""

    __slots__ = (
        "__weakref__",
        "ddp",
        "hooked",
        "in_backward",
        "keep",
        "model",
        "name",
        "open",
        "optimizers",
        "pending",
        "probed",
        "record",
        "sentinels",
        "state",
        "warned",
    )

    def __init__(self, model: nn.Module, parallel: distributed.DataParallel) -> None:
        inner = parallel.model
        self.model = weakref.ref(inner)
        self.name = type(inner).__name__
        params = [param for param in inner.parameters() if param.requires_grad]
        self.sentinels: tuple[torch.Tensor, ...] = (
            () if parallel.kind == "fsdp2" else (_smallest(params))
        )
        """Parameters whose ``.grad`` is recorded after each backward."""
        self.keep = frozenset(id(param) for param in self.sentinels)
        """Ids of the sentinels, whose ``.grad`` ``accum_dtype`` zeroes instead of clearing."""
        self.hooked = _has_post_hooks(params)
        self.probed = False
        """A backward with the post-accumulate-grad hooks ran without stepping."""
        self.record: _Record | None = None
        self.open = False
        """The window holds micro-batches and is not closed: no optimizer may step."""
        self.in_backward = False
        self.state: AccumState | None = None
        """The state the last micro-step left: a window continues from it."""
        self.pending = False
        """The window of ``state`` holds micro-batches not applied (nor saved)."""
        self.warned = False
        self.optimizers: tuple[weakref.ref[torch.optim.Optimizer], ...] = ()
        ddp = parallel.ddp
        rebuilds = ddp is not None and ddp.gradient_as_bucket_view
        self.ddp = weakref.ref(ddp) if rebuilds and not ddp._has_rebuilt_buckets else None  # type: ignore[union-attr]
        """DDP before its one-time bucket rebuild, which moves ``.grad`` into its buckets."""

    # -- the window's optimizers ---------------------------------------------------------------
    def watch(self, optimizers: Sequence[torch.optim.Optimizer], window: object) -> None:
        """Take the window's optimizers (known to ``GradientAccumulator`` from the start, to
        the functional API from the first step): their parameters are the sentinels, and
        their steps are hooked. Nothing to do when they are those already watched."""
        known = self.optimizers
        if len(known) == len(optimizers) and all(
            ref() is optimizer for ref, optimizer in zip(known, optimizers, strict=True)
        ):
            return
        for optimizer in optimizers:
            check_foreign_optimizer(optimizer, window)
        sentinels: list[torch.Tensor] = []
        for optimizer in optimizers:
            params = list(optimizer_params(optimizer))
            sentinels.extend(_smallest(params))
            self.hooked = self.hooked or _has_post_hooks(params)
        self.sentinels = tuple(sentinels)
        self.keep = frozenset(id(param) for param in sentinels)
        self.optimizers = tuple(weakref.ref(optimizer) for optimizer in optimizers)
        for optimizer in optimizers:
            target = _hook_target(optimizer)
            if target is None:
                continue
            hook = _HOOKS.get(target)
            if hook is None:
                hook = _HOOKS[target] = _StepHook()
                target.register_step_pre_hook(hook)
            hook.guard = weakref.ref(self)

    # -- the checks ----------------------------------------------------------------------------
    def check(self, state: AccumState) -> None:
        """Raise ``CallOrderError`` if a recorded gradient changed since accumfn's backward,
        when ``state`` continues the window (a fresh or another state starts its own)."""
        if state is not self.state:
            return
        found = self._changed()
        if found is not None:
            raise CallOrderError(self._touched_message(*found))

    def intact(self) -> bool:
        """The recorded gradients are as accumfn's backward left them."""
        return self._changed() is None

    def _changed(self) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        record = self.record
        if record is None:
            return None
        for param, grad, version in record:
            now = param.grad
            if now is grad and (now is None or now._version == version):
                continue
            if now is not None and grad is not None and self._rebuilt():
                continue
            return now, grad
        return None

    def _rebuilt(self) -> bool:
        """DDP rebuilt its buckets since the record (once in a run): ``.grad`` moved there."""
        ddp = None if self.ddp is None else self.ddp()
        return ddp is not None and bool(ddp._has_rebuilt_buckets)

    def backward(self, tensor: torch.Tensor) -> None:
        """``torch.autograd.backward(tensor)``, refusing optimizers stepped inside it."""
        if not self.hooked:
            self.in_backward = True
            try:
                torch.autograd.backward(tensor)
            except BaseException:
                self._rerecord()  # what accumfn's (failed) backward left is not a loop's doing
                raise
            finally:
                self.in_backward = False
            return
        snapshot = None if self.probed else self._snapshot()
        handle = register_optimizer_step_pre_hook(_refuse_in_backward)
        self.in_backward = True
        try:
            torch.autograd.backward(tensor)
        except _SteppedInBackward as exc:
            if snapshot is not None:
                for param, grad in snapshot:
                    param.grad = grad
            self._rerecord()
            raise _in_backward_error(exc.optimizer, undone=snapshot is not None) from None
        except BaseException:
            self._rerecord()
            raise
        finally:
            self.in_backward = False
            handle.remove()
        self.probed = True

    def _rerecord(self) -> None:
        if self.record is not None:
            self._record()

    def _snapshot(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """The window's gradients before a backward that may have to be undone."""
        params: dict[int, torch.Tensor] = {}
        model = self.model()
        if model is not None:
            params.update((id(p), p) for p in model.parameters())
        for ref in self.optimizers:
            optimizer = ref()
            if optimizer is not None:
                params.update((id(p), p) for p in optimizer_params(optimizer))
        return [
            (param, None if param.grad is None else param.grad.clone()) for param in params.values()
        ]

    # -- what happened to the window -----------------------------------------------------------
    def note(self, state: AccumState) -> None:
        """After accumfn's backward of a micro-step that left the window open."""
        self.open = True
        self.state = state
        self.pending = True
        self._record()
        if self.ddp is not None and self._rebuilt():
            self.ddp = None

    def _record(self) -> None:
        sentinels = self.sentinels
        if len(sentinels) == 1:
            param = sentinels[0]
            grad = param.grad
            self.record = ((param, grad, 0 if grad is None else grad._version),)
            return
        self.record = tuple(
            (param, param.grad, 0 if param.grad is None else param.grad._version)
            for param in sentinels
        )

    def closed(self, state: AccumState) -> None:
        """The window closed; its step comes next (accumfn's, so optimizers may step)."""
        self.record = None
        self.open = False
        self.state = state
        self.pending = True

    def applied(self) -> None:
        """The window's step ran (or it was dropped): nothing is left to apply."""
        self.record = None
        self.open = False
        self.state = None
        self.pending = False
        self.warned = False

    def saved(self) -> None:
        """A checkpoint holds the open window: leaving it unapplied loses nothing."""
        self.pending = False
        self.warned = False

    def restored(self, state: AccumState) -> None:
        """A checkpoint put an open window's gradients back (it lives in the file too)."""
        self.record = None
        self.open = state.is_accumulating and not state.closed
        self.state = state
        self.pending = False
        self.warned = False

    # -- messages ------------------------------------------------------------------------------
    def _held(self) -> str:
        state = self.state
        if state is None:
            return "an open window"
        return f"an open window ({state.micro_step} of {state.window} micro-batches accumulated)"

    def step_message(self, optimizer: object) -> str:
        return (
            f"optimizer.step() ({type(optimizer).__name__}) was called inside {self._held()}: "
            f"accumfn steps the optimizer itself, once per window (when accumulate returns "
            f"True, or in apply_step), on the window's summed gradients. Remove "
            f"optimizer.step() and optimizer.zero_grad() from the loop. The step did not run."
        )

    def _touched_message(self, now: torch.Tensor | None, grad: torch.Tensor | None) -> str:
        if now is None:
            what = (
                "optimizer.zero_grad() (or model.zero_grad(), or .grad = None) ran inside "
                f"{self._held()}: a loop's zero_grad drops the window's gradients before "
                "its step. Remove optimizer.zero_grad() from the loop: accumfn zeroes the "
                "gradients after each window's step"
            )
        elif grad is None:
            what = (
                f"a gradient appeared inside {self._held()} from a backward accumfn did not "
                "run (loss.backward(), or accumulate on another model whose loss reaches "
                "these parameters). Remove loss.backward(): accumulate runs backward itself"
            )
        elif now is not grad:
            what = (
                f"a parameter's .grad was replaced (param.grad = ...) inside {self._held()}, "
                "dropping the window's gradients. Remove that assignment; to edit the "
                "window's gradients, use before_step"
            )
        else:
            what = (
                f"a gradient was changed in place inside {self._held()}: "
                "optimizer.zero_grad(set_to_none=False), clip_grad_norm_ on each "
                "micro-batch, or another in-place write to .grad. Remove it: accumfn zeroes "
                "the gradients after each window's step and clips once per window "
                "(max_grad_norm); to edit the window's gradients, use before_step"
            )
        return f"{what}. Nothing was run for this micro-batch."

    def report(self, reason: str, fix: str) -> None:
        """Warn once that the window's micro-batches were never applied."""
        state = self.state
        if state is None or state.micro_step == 0 or not self.pending or self.warned:
            return
        self.warned = True
        left = "closed but never stepped" if state.closed else "never applied"
        warnings.warn(
            UnappliedWindowWarning(
                f"{reason} with a window of {state.micro_step} micro-batch(es) of "
                f"{self.name} {left}: its gradients were not applied to the model. {fix}"
            ),
            stacklevel=2,
        )

    def gone(self) -> None:
        """The model was garbage-collected."""
        if not _exiting:
            self.report("accumfn: a model was garbage-collected", _FUNCTIONAL_FIX)


_FUNCTIONAL_FIX = (
    "Pass is_final_batch=True with the last micro-batch, or call flush after the loop "
    "(GradientAccumulator.flush(), or accumfn.flush(state, model) and then apply_step); "
    "call apply_step whenever accumulate returns stepped=True."
)

_GUARDS: weakref.WeakKeyDictionary[nn.Module, WindowGuard] = weakref.WeakKeyDictionary()
_last: tuple[weakref.ref[nn.Module], WindowGuard] | None = None
"""The model asked about last and its guard: most runs train one model."""
_exiting = False


def guard_for(
    model: nn.Module, parallel: distributed.DataParallel | None = None, window: object = "?"
) -> WindowGuard:
    """The model's guard, made on first use (``window``: accumfn's, for the message of a
    model another trainer accumulates for, refused then)."""
    global _last
    last = _last
    if last is not None and last[0]() is model:
        return last[1]
    guard = _GUARDS.get(model)
    if guard is None:
        check_foreign_model(model, window)
        guard = WindowGuard(model, parallel or distributed.strategy(model))
        _GUARDS[model] = guard
        weakref.finalize(model, guard.gone).atexit = False
    _last = (weakref.ref(model), guard)
    return guard


def existing_guard(model: object) -> WindowGuard | None:
    """The model's guard if it has one."""
    return _GUARDS.get(model) if isinstance(model, nn.Module) else None


def guards_of(optimizers: Iterable[torch.optim.Optimizer]) -> list[WindowGuard]:
    """The guards watching any of ``optimizers``."""
    found: list[WindowGuard] = []
    for optimizer in optimizers:
        target = _hook_target(optimizer)
        hook = None if target is None else _HOOKS.get(target)
        guard = None if hook is None or hook.guard is None else hook.guard()
        if guard is not None and guard not in found:
            found.append(guard)
    return found


def all_guards() -> list[WindowGuard]:
    return list(_GUARDS.values())


def report_dropped(model: nn.Module | None) -> None:
    """A ``GradientAccumulator`` training ``model`` was garbage-collected."""
    guard = None if model is None or _exiting else _GUARDS.get(model)
    if guard is not None:
        guard.report(
            "accumfn: a GradientAccumulator was garbage-collected",
            "Pass is_final_batch=True with the last micro-batch, or call accumulator.flush() "
            "after the loop.",
        )


@atexit.register
def _at_exit() -> None:
    global _exiting
    _exiting = True
    for guard in list(_GUARDS.values()):
        guard.report("accumfn: the program ended", _FUNCTIONAL_FIX)
