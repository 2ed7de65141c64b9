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
- The state accumfn returned for the window (open or closed) and the GradScaler that
  scaled its losses are recorded: a later micro-step, ``flush`` or step of that state with
  another GradScaler is a ``ConfigError`` before anything runs (after a resume none is
  recorded: the core's check of a scaler against none remains). The closed state whose
  step ran last is recorded too: stepping it again is a ``CallOrderError``.

Cost on a micro-step that continues a window: the guard is an attribute of the model's
strategy; the sentinel's ``.grad`` and its version are read before the backward and the
version once after (the gradient accumulates in place): a few attribute reads, no
host-device sync (see docs/benchmarks.md for the measured figure).

Legitimate writers set the guard themselves: accumfn's backward (``note``), the window's
close and step (``closed``, ``applied``), ``reset_epoch`` (``applied``), a checkpoint
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
from torch.amp import GradScaler
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .. import parallel as distributed
from ..core import AccumState
from ..errors import CallOrderError, ConfigError, UnappliedWindowWarning
from ..grads import optimizer_params
from ._foreign import check_foreign_model, check_foreign_optimizer

__all__ = [
    "WindowGuard",
    "all_guards",
    "continue_guard",
    "existing_guard",
    "guard_for",
    "guards_of",
    "report_dropped",
]


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


class _Sentinel:
    """One parameter whose ``.grad`` (tensor and version counter) is recorded."""

    __slots__ = ("grad", "param", "version")

    def __init__(self, param: torch.Tensor) -> None:
        self.param = param
        self.grad: torch.Tensor | None = None
        self.version = 0

    def read(self) -> None:
        grad = self.grad = self.param.grad
        self.version = 0 if grad is None else grad._version

    def moved(self) -> bool:
        return self.grad is not None and self.grad._version != self.version


class WindowGuard:
    """The guard of one model's open window (see the module's doc)."""

    __slots__ = (
        "__weakref__",
        "ddp",
        "grad",
        "hooked",
        "keep",
        "left",
        "model",
        "name",
        "open",
        "optimizers",
        "others",
        "param",
        "probed",
        "returned",
        "scaler",
        "state",
        "stepped",
        "version",
        "warned",
    )

    def __init__(self, model: nn.Module, parallel: distributed.DataParallel) -> None:
        inner = parallel.model
        self.model = weakref.ref(inner)
        self.name = type(inner).__name__
        params = [param for param in inner.parameters() if param.requires_grad]
        # The sentinels: parameters whose .grad (tensor, version) is recorded after each
        # backward; the first one's record lives in param/grad/version (the micro-step's
        # cost), the others' (one per further optimizer) in ``others``.
        self.param: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None
        self.version = 0
        self.others: list[_Sentinel] = []
        self.keep: frozenset[int] = frozenset()
        """Ids of the sentinels, whose ``.grad`` ``accum_dtype`` zeroes instead of clearing."""
        self.state: AccumState | None = None
        """The state the last micro-step returned with its window open, while the record
        holds what that micro-step's backward left: the next micro-step continues from it."""
        if parallel.kind != "fsdp2":  # FSDP2's are not .grad until the window's sync
            self._sentinels(_smallest(params))
        self.hooked = _has_post_hooks(params)
        self.probed = False
        """A backward with the post-accumulate-grad hooks ran without stepping."""
        self.open = False
        """The window holds micro-batches and is not closed: no optimizer may step."""
        self.left: AccumState | None = None
        """The state of a window whose micro-batches are not applied (nor saved)."""
        self.warned = False
        self.returned: AccumState | None = None
        """The state accumfn's last micro-step (or ``flush``) on this model returned, open
        or closed, until its step: a state that is it continues that window."""
        self.scaler: weakref.ref[GradScaler] | None = None
        """The GradScaler that scaled the losses of the window ``returned`` holds (None:
        none, or none known)."""
        self.stepped: weakref.ref[AccumState] | None = None
        """The closed state whose step ran last: a second step of it is refused."""
        self.optimizers: tuple[weakref.ref[torch.optim.Optimizer], ...] = ()
        ddp = parallel.ddp
        rebuilds = ddp is not None and ddp.gradient_as_bucket_view
        self.ddp = weakref.ref(ddp) if rebuilds and not ddp._has_rebuilt_buckets else None  # type: ignore[union-attr]
        """DDP before its one-time bucket rebuild, which moves ``.grad`` into its buckets."""

    def _sentinels(self, params: Sequence[torch.Tensor]) -> None:
        self.param = params[0] if params else None
        self.grad = None
        self.others = [_Sentinel(param) for param in params[1:]]
        self.keep = frozenset(id(param) for param in params)
        self.state = None  # nothing recorded of these yet

    # -- the window's optimizers ---------------------------------------------------------------
    def watch(self, optimizers: Sequence[torch.optim.Optimizer], window: object) -> None:
        """Take the window's optimizers (known to ``GradientAccumulator`` from the start, to
        the functional API from the first step): their parameters are the sentinels, and
        their steps are hooked. Nothing to do when they are those already watched."""
        known = self.optimizers
        if len(known) == len(optimizers) and (
            known[0]() is optimizers[0]
            if len(known) == 1
            else all(ref() is item for ref, item in zip(known, optimizers, strict=True))
        ):
            return
        for optimizer in optimizers:
            check_foreign_optimizer(optimizer, window)
        sentinels: list[torch.Tensor] = []
        for optimizer in optimizers:
            params = list(optimizer_params(optimizer))
            sentinels.extend(_smallest(params))
            self.hooked = self.hooked or _has_post_hooks(params)
        self._sentinels(sentinels)
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
            self.state = None  # a window of its own: recorded anew after its backward
            return
        param = self.param
        if param is not None:
            now = param.grad
            if now is not self.grad or (now is not None and now._version != self.version):
                self._changed(now, self.grad)
        if self.others:
            for sentinel in self.others:
                now = sentinel.param.grad
                if now is not sentinel.grad or (now is not None and sentinel.moved()):
                    self._changed(now, sentinel.grad)

    def check_scaler(self, state: AccumState, scaler: GradScaler, where: str) -> None:
        """``ConfigError`` if ``state`` continues the recorded window and ``scaler`` is not
        the GradScaler that scaled its losses (``where``: "accumulate", "flush", "step")."""
        held = self.scaler
        if held is None or state is not self.returned or held() is scaler:
            return
        given = {
            "accumulate": "this micro-batch was given",
            "flush": "flush was given",
            "step": "this window's step was given",
        }[where]
        raise ConfigError(
            f"{given} another GradScaler than the one that scaled the window's earlier "
            f"losses: their gradients carry that scaler's scale, which this one would not "
            f"unscale (nor would its update keep the scale the window was summed at). Pass "
            f"the same GradScaler to every micro-batch of a window and to its step; with "
            f"GradientAccumulator, assign acc.scaler between windows, not inside one. "
            f"(Nothing was run.)"
        )

    def check_stepped(self, state: AccumState) -> None:
        """``CallOrderError`` if ``state`` is the closed state whose step already ran."""
        stepped = self.stepped
        if stepped is not None and stepped() is state:
            raise CallOrderError(
                "this closed window was already stepped (apply_step or step_window ran with "
                "this state): its gradients were applied and zeroed, and stepping it again "
                "would count the window twice. Continue from the state that step returned "
                "(apply_step's result, StepReport.state, or StepError.state). (Nothing was "
                "run.)"
            )

    def _keep_scaler(self, scaler: GradScaler | None) -> None:
        if scaler is None:
            self.scaler = None
        elif self.scaler is None or self.scaler() is not scaler:
            self.scaler = weakref.ref(scaler)

    def intact(self) -> bool:
        """The recorded gradients are as accumfn's backward left them (asked at a step)."""
        if self.state is None:
            return True
        try:
            self.check(self.state)
        except CallOrderError:
            return False
        return True

    def _changed(self, now: torch.Tensor | None, grad: torch.Tensor | None) -> None:
        """A sentinel's gradient differs from the record: DDP's bucket rebuild (let through,
        recorded anew), or anything else: raised."""
        if now is not None and grad is not None and self._rebuilt():
            self._read()
            self.ddp = None  # it rebuilds once
            return
        raise CallOrderError(self._touched_message(now, grad))

    def _rebuilt(self) -> bool:
        """DDP rebuilt its buckets since the record (once in a run): ``.grad`` moved there."""
        ddp = None if self.ddp is None else self.ddp()
        return ddp is not None and bool(ddp._has_rebuilt_buckets)

    def _read(self) -> None:
        """Record the sentinels' gradients as they are."""
        param = self.param
        if param is not None:
            grad = self.grad = param.grad
            self.version = 0 if grad is None else grad._version
        for sentinel in self.others:
            sentinel.read()

    def backward(self, tensor: torch.Tensor) -> None:
        """``torch.autograd.backward(tensor)`` for a model whose parameters carry
        post-accumulate-grad hooks: an optimizer stepped inside it is refused, and the first
        such backward is undone (its gradients put back), so the refusal changes nothing."""
        snapshot = None if self.probed else self._snapshot()
        handle = register_optimizer_step_pre_hook(_refuse_in_backward)
        try:
            torch.autograd.backward(tensor)
        except _SteppedInBackward as exc:
            if snapshot is not None:
                for param, grad in snapshot:
                    param.grad = grad
            raise _in_backward_error(exc.optimizer, undone=snapshot is not None) from None
        finally:
            handle.remove()
        self.probed = True

    def failed(self) -> None:
        """After a backward that raised: what it left is accumfn's doing, not a loop's."""
        if self.state is not None:
            self._read()

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
    def note(self, state: AccumState, scaler: GradScaler | None = None) -> None:
        """After accumfn's backward of a micro-step that left the window open (``scaler``:
        the enabled GradScaler that scaled its loss)."""
        if self.state is not None:  # the window went on: the same tensors, new versions
            grad = self.grad
            if grad is not None:
                self.version = grad._version
            elif self.param is not None:
                grad = self.grad = self.param.grad
                self.version = 0 if grad is None else grad._version
            if self.others:
                for sentinel in self.others:
                    sentinel.read()
        else:
            self.open = True
            self._read()
            if self.ddp is not None and self._rebuilt():
                self.ddp = None  # rebuilt with no gradient to move: nothing to let through
        self.state = self.left = self.returned = state
        if scaler is not None or self.scaler is not None:
            self._keep_scaler(scaler)

    def closed(self, state: AccumState, scaler: GradScaler | None = None) -> None:
        """The window closed; its step comes next (accumfn's, so optimizers may step)."""
        self.state = None
        self.open = False
        self.left = self.returned = state
        self._keep_scaler(scaler)

    def applied(self, stepped: AccumState | None = None) -> None:
        """The window's step ran (``stepped``: its closed state), or it was dropped:
        nothing is left to apply."""
        self.state = self.left = self.returned = None
        self.scaler = None
        self.open = False
        self.warned = False
        if stepped is not None:
            self.stepped = weakref.ref(stepped)

    def saved(self) -> None:
        """A checkpoint holds the open window: leaving it unapplied loses nothing."""
        self.left = None
        self.warned = False

    def restored(self, state: AccumState) -> None:
        """A checkpoint put an open window's gradients back (it lives in the file too);
        which GradScaler scaled it is not known."""
        self.state = self.left = self.returned = None
        self.scaler = None
        self.open = state.is_accumulating and not state.closed
        self.warned = False

    # -- messages ------------------------------------------------------------------------------
    def _held(self) -> str:
        state = self.left
        if state is None:
            return "an open window"
        if state.caller_closed:
            return f"an open window ({state.micro_step} micro-batches accumulated)"
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
        state = self.left
        if state is None or state.micro_step == 0 or self.warned:
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
_exiting = False


def guard_for(
    model: nn.Module, parallel: distributed.DataParallel | None = None, window: object = "?"
) -> WindowGuard:
    """The model's guard, made on first use and kept on its strategy (``window``:
    accumfn's, for the message of a model another trainer accumulates for, refused then)."""
    parallel = parallel or distributed.strategy(model)
    guard: WindowGuard | None = parallel.guard
    if guard is not None:
        return guard
    guard = _GUARDS.get(model)
    if guard is None:
        check_foreign_model(model, window)
        guard = WindowGuard(model, parallel)
        _GUARDS[model] = guard
        weakref.finalize(model, guard.gone).atexit = False
    parallel.guard = guard
    return guard


def existing_guard(model: object) -> WindowGuard | None:
    """The model's guard if it has one."""
    return _GUARDS.get(model) if isinstance(model, nn.Module) else None


def continue_guard(model: nn.Module | None, old: AccumState, new: AccumState) -> None:
    """``new`` (a copy of ``old`` with other counters) continues ``old``'s window."""
    guard = existing_guard(model)
    if guard is not None:
        if guard.state is old:
            guard.state = new
        if guard.left is old:
            guard.left = new
        if guard.returned is old:
            guard.returned = new


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
    """A ``GradientAccumulator`` training ``model`` was garbage-collected (called from its
    ``__del__``, which can raise nothing: an error here, e.g. the warning turned into one by
    ``-W error`` or at interpreter shutdown when the modules may be gone, is dropped)."""
    try:
        guard = None if model is None or _exiting else _GUARDS.get(model)
        if guard is not None:
            guard.report(
                "accumfn: a GradientAccumulator was garbage-collected",
                "Pass is_final_batch=True with the last micro-batch, or call "
                "accumulator.flush() after the loop.",
            )
    except Exception:
        pass


@atexit.register
def _at_exit() -> None:
    global _exiting
    _exiting = True
    for guard in list(_GUARDS.values()):
        guard.report("accumfn: the program ended", _FUNCTIONAL_FIX)
