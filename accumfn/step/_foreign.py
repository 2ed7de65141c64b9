"""Other trainers' objects handed to accumfn, recognised by their types (nothing imported).

An Accelerate-prepared optimizer skips every ``step()`` outside its own windows, and a
DeepSpeed engine or Lightning Fabric's scaled precision run backward and the step their own
way: with accumfn's window on top, the update is silently wrong. They are refused before
anything changes (Accelerate with the same conflict error as Lightning's), and driven where
that is exact: Accelerate with ``gradient_accumulation_steps=1`` and no fp16 loss scaler,
Fabric on one device without a loss scaler.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from ..errors import AccumulationConflictError, ConfigError

__all__ = ["check_foreign_model", "check_foreign_optimizer", "foreign_name"]


def foreign_name(obj: object, package: str) -> str | None:
    """The name of the first class of ``obj`` defined in ``package``, else None."""
    for cls in type(obj).__mro__:
        module = getattr(cls, "__module__", "") or ""
        if module == package or module.startswith(package + "."):
            return cls.__name__
    return None


def _accelerate_steps(shared: object) -> tuple[int, bool] | None:
    """``(gradient_accumulation_steps, sync_gradients)`` from Accelerate's shared
    ``GradientState`` dict; None when there is none."""
    if not isinstance(shared, Mapping) or not shared:
        return None
    kwargs = shared.get("plugin_kwargs") or {}
    steps = kwargs.get("num_steps", 1) if isinstance(kwargs, Mapping) else 1
    return (steps if isinstance(steps, int) else 1), bool(shared.get("sync_gradients", True))


def _accelerate_conflict(window: object, steps: int, what: str) -> AccumulationConflictError:
    return AccumulationConflictError(
        "Gradient accumulation conflict detected!\n"
        f"  Manual accumulation_steps: {window}\n"
        f"  Accelerate gradient_accumulation_steps: {steps} (an Accelerate-prepared {what})\n"
        "Accelerate's prepared optimizer skips every step() outside its own windows, so "
        "accumfn's steps would be dropped.\n"
        "\n"
        "Resolution options:\n"
        "  1. Build the Accelerator with gradient_accumulation_steps=1 and remove "
        "`with accelerator.accumulate(model):` (let accumfn accumulate; prepare() stays)\n"
        "  2. Remove accumfn (let Accelerate manage: accelerator.backward(loss), "
        "optimizer.step() inside accelerator.accumulate)"
    )


def _gradient_state() -> object:
    """Accelerate's process-wide ``GradientState`` dict if Accelerate was imported."""
    state = sys.modules.get("accelerate.state")
    return getattr(getattr(state, "GradientState", None), "_shared_state", None)


def check_foreign_optimizer(optimizer: object, window: object) -> None:
    """Refuse an optimizer another trainer steps its own way (``window``: accumfn's, for
    the message); Accelerate's with ``gradient_accumulation_steps=1`` passes."""
    if foreign_name(optimizer, "deepspeed") is not None:
        raise _deepspeed(optimizer, "optimizer")
    if foreign_name(optimizer, "accelerate") == "AcceleratedOptimizer":
        gradient_state = getattr(optimizer, "gradient_state", None)
        found = _accelerate_steps(getattr(gradient_state, "__dict__", None))
        if found is not None and (found[0] > 1 or not found[1]):
            raise _accelerate_conflict(window, found[0], "optimizer")
        if getattr(optimizer, "scaler", None) is not None:
            raise ConfigError(
                "this optimizer is Accelerate's (AcceleratedOptimizer) under "
                "mixed_precision='fp16', whose GradScaler scales the loss in "
                "accelerator.backward, which accumfn's accumulate does not call, and unscales "
                "it in the optimizer's step, so the update would be divided by the loss scale. "
                "Use mixed_precision='bf16' or 'no' with accumfn, or give accumfn the "
                "unwrapped optimizer (optimizer.optimizer) and a GradScaler of your own "
                "(scaler=)."
            )
    fabric = foreign_name(optimizer, "lightning.fabric") or foreign_name(
        optimizer, "lightning_fabric"
    )
    if fabric is not None:
        precision = getattr(getattr(optimizer, "_strategy", None), "precision", None)
        if getattr(precision, "scaler", None) is not None:
            raise ConfigError(
                f"this optimizer is Lightning Fabric's ({fabric}) under a precision with a "
                f"GradScaler ({type(precision).__name__}): Fabric scales the loss in "
                f"fabric.backward, which accumfn's accumulate does not call, and unscales it "
                f"in its optimizer's step, so the update would be divided by the loss scale. "
                f"Use precision='bf16-mixed' or '32-true' with accumfn, or pass accumfn the "
                f"unwrapped optimizer (fabric_optimizer.optimizer) and a GradScaler of your "
                f"own (scaler=)."
            )


def check_foreign_model(model: object, window: object) -> None:
    """Refuse a model another trainer wraps or accumulates for (see the module's doc)."""
    if foreign_name(model, "deepspeed") is not None:
        raise _deepspeed(model, "model")
    if getattr(model, "_is_accelerate_prepared", False) is True:
        found = _accelerate_steps(_gradient_state())
        if found is not None and (found[0] > 1 or not found[1]):
            raise _accelerate_conflict(window, found[0], "model")
    fabric = foreign_name(model, "lightning.fabric") or foreign_name(model, "lightning_fabric")
    if fabric is not None:
        inner: Any = getattr(model, "_forward_module", None)
        original = getattr(model, "_original_module", None)
        if inner is not None and inner is not original:
            raise ConfigError(
                f"this model is Lightning Fabric's ({fabric}), and Fabric's strategy wrapped "
                f"it in {type(inner).__name__}, whose backward and gradient sync Fabric runs "
                f"(fabric.backward), out of accumfn's reach. accumfn drives Fabric's wrappers "
                f"on one device; with several, wrap the module in DistributedDataParallel or "
                f"shard it with fully_shard yourself and pass that, or use Fabric's own "
                f"accumulation (fabric.no_backward_sync)."
            )


def _deepspeed(obj: object, what: str) -> ConfigError:
    return ConfigError(
        f"this {what} is DeepSpeed's ({foreign_name(obj, 'deepspeed')}): a DeepSpeed engine "
        f"accumulates by itself (gradient_accumulation_steps in its config; engine.backward "
        f"and engine.step run its windows, ZeRO partitions and loss scaling), which accumfn "
        f"cannot drive. Let DeepSpeed accumulate (remove accumfn), or train the plain module "
        f"with a torch optimizer under accumfn (DistributedDataParallel or fully_shard for "
        f"several processes)."
    )
