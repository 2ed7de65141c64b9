"""What a window's step covers, and the checks made on it before anything changes.

A window covers one parameter set: the parameters of the optimizer(s) it steps. The model
is consulted only for gradient sync, and for the one-time warning about trainable
parameters no optimizer owns.
"""

from __future__ import annotations

import functools
import inspect
import operator
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias

import torch
from torch import nn
from torch.amp import GradScaler

from ..errors import ConfigError, caller_level
from ..grads import optimizer_params
from ._foreign import check_foreign_optimizer

__all__ = [
    "LRScheduler",
    "Optimizers",
    "Schedulers",
    "as_optimizers",
    "as_schedulers",
    "check_fp16_with_scaler",
    "check_steppable",
    "claim_scaler",
    "enabled",
    "param_set",
    "warn_untracked",
    "window_params",
]


class LRScheduler(Protocol):
    """Anything with ``step()``: torch's LR schedulers and most others."""

    def step(self) -> Any: ...


Optimizers: TypeAlias = torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
"""One optimizer, or a list of them stepped together (one window, one GradScaler)."""
Schedulers: TypeAlias = (
    LRScheduler | Callable[[], object] | Sequence[LRScheduler | Callable[[], object]]
)
"""Schedulers stepped without arguments once per applied window, or zero-argument callables."""


def _items(value: object) -> tuple[object, ...]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def as_optimizers(optimizer: object, *, hint: str = "") -> tuple[torch.optim.Optimizer, ...]:
    """``optimizer`` (one, or a list or tuple of them) as a tuple; ConfigError if it is not."""
    items = _items(optimizer)
    if not items:
        raise ConfigError(
            "optimizer is an empty sequence: pass a torch.optim.Optimizer, or a list of the "
            "optimizers the window steps."
        )
    for index, item in enumerate(items):
        if not isinstance(item, torch.optim.Optimizer):
            check_foreign_optimizer(item, None)  # DeepSpeed's: say so
            where = f"optimizer[{index}]" if isinstance(optimizer, (list, tuple)) else "optimizer"
            raise ConfigError(
                f"{where} must be a torch.optim.Optimizer (or a list of them), got "
                f"{type(item).__name__}{hint}."
            )
    if len({id(item) for item in items}) != len(items):
        raise ConfigError("the same optimizer appears twice in the optimizer list: pass each once.")
    return items  # type: ignore[return-value]  # every item checked above


def _required_args(fn: Callable[..., object], *, skip: int = 0) -> list[str]:
    """Names of the arguments ``fn`` cannot be called without ([] when it cannot be told),
    after the first ``skip`` ones. A method's answer is its class function's, kept."""
    if inspect.ismethod(fn) and inspect.isfunction(fn.__func__):
        return _function_required_args(fn.__func__, skip + 1)
    if inspect.isfunction(fn) and "<locals>" not in fn.__qualname__:
        return _function_required_args(fn, skip)
    return _signature_required_args(fn, skip)


@functools.cache
def _function_required_args(fn: Callable[..., object], skip: int) -> list[str]:
    """``_signature_required_args`` for a module- or class-level function: asked once, as
    ``inspect.signature`` costs tens of microseconds and a window step asks every time."""
    return _signature_required_args(fn, skip)


def _signature_required_args(fn: Callable[..., object], skip: int) -> list[str]:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    kinds = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )
    return [
        name
        for name, parameter in list(signature.parameters.items())[skip:]
        if parameter.kind in kinds and parameter.default is inspect.Parameter.empty
    ]


def check_steppable(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Raise ConfigError for an optimizer whose ``step()`` needs a closure (LBFGS)."""
    for optimizer in optimizers:
        # The class's method: an LR scheduler wraps the instance's step in (*args, **kwargs).
        needed = _required_args(type(optimizer).step, skip=1)
        if needed:
            name = type(optimizer).__name__
            raise ConfigError(
                f"{name}.step() needs {', '.join(needed)} (it re-evaluates the loss within "
                f"one step), which accumulated gradients cannot give: accumulate with an "
                f"optimizer that steps without a closure (SGD, Adam, AdamW, ...), or drive "
                f"{name} yourself with optimizer.step(closure) on the full batch."
            )


def as_schedulers(scheduler: object) -> tuple[Callable[[], object], ...]:
    """The zero-argument step functions of ``scheduler`` (one, a list, or None).

    A scheduler whose ``step()`` needs arguments (``ReduceLROnPlateau``) is refused here,
    before any window is stepped.
    """
    if scheduler is None:
        return ()
    steps: list[Callable[[], object]] = []
    for item in _items(scheduler):
        step = getattr(item, "step", None)
        fn = step if callable(step) else item if callable(item) else None
        name = type(item).__name__
        if fn is None:
            raise ConfigError(
                f"scheduler must have a step() method or be a zero-argument callable, got {name}."
            )
        needed = _required_args(fn)
        if needed:
            call = f"{name}.step()" if fn is step else f"scheduler {name}"
            raise ConfigError(
                f"{call} needs {', '.join(needed)}, and accumfn steps schedulers without "
                f"arguments once per applied window: step it yourself (e.g. after validation, "
                f"or when StepReport.applied is True), or pass a zero-argument callable such "
                f"as scheduler=lambda: plateau.step(latest_val_loss)."
            )
        steps.append(fn)
    return tuple(steps)


class ParamSet:
    """A window's parameters: all of them, and each optimizer's (read-only lists)."""

    __slots__ = ("groups", "optimizers", "params", "per_optimizer", "present")

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        per_optimizer = _resolve(optimizers)
        self.groups = [
            [list(group["params"]) for group in optimizer.param_groups] for optimizer in optimizers
        ]
        """A copy of every param group's list, as the set was resolved from."""
        self.optimizers = (
            weakref.ref(optimizers[0], _forget(id(optimizers[0]))),
            *(weakref.ref(optimizer) for optimizer in optimizers[1:]),
        )
        self.per_optimizer = per_optimizer
        self.params = [param for params in per_optimizer for param in params]
        self.present = [True] * len(per_optimizer)
        """One True per optimizer (read-only): "has gradients" when nobody looked."""

    def current(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """Whether every param group still holds the same tensors, in the same order: a
        group added, a ``params`` list replaced, resized or a tensor in it swapped all
        count. The tensors are compared by identity in C (``map(operator.is_, ...)``), with
        no Python step per parameter."""
        for optimizer, groups in zip(optimizers, self.groups, strict=True):
            now = optimizer.param_groups
            if len(now) != len(groups):
                return False
            for group, old in zip(now, groups, strict=True):
                params = group["params"]
                if len(params) != len(old) or not all(map(operator.is_, params, old)):
                    return False
        return True

    def covers(self, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        if len(self.optimizers) != len(optimizers):
            return False
        for ref, optimizer in zip(self.optimizers, optimizers, strict=True):
            if ref() is not optimizer:
                return False
        return True


def _forget(first: int) -> Callable[[object], None]:
    def forget(_: object) -> None:
        _param_sets.pop(first, None)

    return forget


_param_sets: dict[int, ParamSet] = {}
"""By the id of the set's first optimizer; an entry goes when that optimizer does."""


def param_set(optimizers: Sequence[torch.optim.Optimizer]) -> ParamSet:
    """The window's parameter set, resolved once per optimizer set and again whenever its
    param groups change; ConfigError if two optimizers share a parameter."""
    found = _param_sets.get(id(optimizers[0]))
    if found is not None and found.covers(optimizers) and found.current(optimizers):
        return found
    found = _param_sets[id(optimizers[0])] = ParamSet(optimizers)
    return found


def window_params(optimizers: Sequence[torch.optim.Optimizer]) -> list[torch.Tensor]:
    """The window's parameter set; ConfigError if two optimizers share a parameter."""
    return param_set(optimizers).params


def _resolve(optimizers: Sequence[torch.optim.Optimizer]) -> list[list[torch.Tensor]]:
    owner: dict[int, int] = {}
    params: list[list[torch.Tensor]] = []
    for index, optimizer in enumerate(optimizers):
        params.append([])
        for param in optimizer_params(optimizer):
            first = owner.setdefault(id(param), index)
            if first != index:
                raise ConfigError(
                    f"a parameter of shape {tuple(param.shape)} is in optimizer {first} and "
                    f"optimizer {index}: it would be unscaled, clipped and stepped twice. Give "
                    f"each parameter to one optimizer."
                )
            params[-1].append(param)
    return params


def enabled(scaler: GradScaler | None) -> GradScaler | None:
    """The scaler if it scales (a disabled GradScaler is the same as none)."""
    return scaler if scaler is not None and scaler.is_enabled() else None


_FP16_HINT = (
    "GradScaler unscales into the gradients, which must be fp32: keep the parameters in "
    "fp32 and run the forward under torch.autocast(device_type, dtype=torch.float16); for "
    "a model kept in fp16 or bf16 drop the GradScaler (bf16 needs none)."
)


def check_fp16_with_scaler(
    params: Sequence[torch.Tensor], scaler: GradScaler | None, *, grads: bool
) -> None:
    """GradScaler's fp16 refusal, before anything is unscaled, with what to do."""
    if enabled(scaler) is None:
        return
    for param in params:
        tensor = param.grad if grads else param
        if tensor is not None and tensor.dtype == torch.float16:
            what = "gradients" if grads else "parameters"
            raise ConfigError(
                f"GradScaler cannot unscale fp16 {what} (torch: 'Attempting to unscale FP16 "
                f"gradients.'), and a parameter of shape {tuple(param.shape)} is fp16. "
                f"{_FP16_HINT}"
            )


_scaler_users: weakref.WeakKeyDictionary[
    GradScaler, tuple[weakref.ref[torch.optim.Optimizer], ...]
] = weakref.WeakKeyDictionary()


def claim_scaler(scaler: GradScaler | None, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Tie an enabled GradScaler to one optimizer set; refuse it to another while that lives.

    Each set's window calls ``scaler.update()``: a second set would change the scale inside
    the first one's open window, so its gradients would be unscaled by the wrong factor.
    """
    if enabled(scaler) is None:
        return
    assert scaler is not None
    given = {id(optimizer) for optimizer in optimizers}
    earlier = [ref() for ref in _scaler_users.get(scaler, ())]
    alive = [optimizer for optimizer in earlier if optimizer is not None]
    if alive and {id(optimizer) for optimizer in alive} != given:
        names = ", ".join(type(optimizer).__name__ for optimizer in alive)
        raise ConfigError(
            f"this GradScaler already serves another optimizer set ({names}); two "
            f"accumulators (or loops) sharing one GradScaler update its scale inside each "
            f"other's open windows. Step all the optimizers in one window instead: "
            f"optimizer=[opt_a, opt_b] (the PyTorch AMP recipe for several optimizers), or "
            f"give each its own GradScaler."
        )
    _scaler_users[scaler] = tuple(weakref.ref(optimizer) for optimizer in optimizers)


_warned: weakref.WeakKeyDictionary[nn.Module, set[tuple[int, ...]]] = weakref.WeakKeyDictionary()


def warn_untracked(
    model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], params: Sequence[torch.Tensor]
) -> None:
    """Warn once per model and optimizer set about trainable parameters no optimizer owns.

    They are left out of the window (no unscale, rescale, clipping, non-finite check) and
    their gradients are left alone, as ``optimizer.zero_grad()`` leaves them.
    """
    seen = _warned.setdefault(model, set())
    key = tuple(id(optimizer) for optimizer in optimizers)
    if key in seen:
        return
    seen.add(key)
    owned = {id(param) for param in params}
    outside = [
        (name, param)
        for name, param in model.named_parameters()
        if param.requires_grad and id(param) not in owned
    ]
    if not outside:
        return
    names = ", ".join(name for name, _ in outside[:3]) + (", ..." if len(outside) > 3 else "")
    values = sum(param.numel() for _, param in outside)
    warnings.warn(
        f"{len(outside)} trainable parameter tensor(s) of the model ({values} values: {names}) "
        f"are in no optimizer given to accumfn: the window's unscale, rescale, clipping and "
        f"non-finite check leave them out, and their gradients are left as they are (they "
        f"keep accumulating: zero them before an optimizer takes them over). Freeze them "
        f"with requires_grad_(False) (e.g. backbone.requires_grad_(False)), or pass their "
        f"optimizer too: optimizer=[opt_a, opt_b].",
        stacklevel=caller_level(),
    )
