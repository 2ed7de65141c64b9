"""Duck-typed detection of a Lightning trainer that accumulates, and the conflict error."""

from __future__ import annotations

import numbers

from ..errors import AccumulationConflictError, ConfigError

__all__ = ["AccumulationConflictError", "check_conflict", "trainer_accumulation"]


def trainer_accumulation(trainer: object) -> int | None:
    """The trainer's ``accumulate_grad_batches`` if it is an int, else None (no import)."""
    value = getattr(trainer, "accumulate_grad_batches", None)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_conflict(accumulation_steps: object, trainer: object) -> None:
    """Raise when manual accumulation and the trainer's would both run, or when ``trainer``
    (None: no trainer) has no int ``accumulate_grad_batches``."""
    lightning_steps = trainer_accumulation(trainer)
    if trainer is not None and lightning_steps is None:
        raise ConfigError(
            f"trainer {type(trainer).__name__} has no int accumulate_grad_batches: pass a "
            f"Lightning Trainer, or trainer=None for manual accumulation."
        )
    manual_steps = accumulation_steps if isinstance(accumulation_steps, int) else None
    if lightning_steps is None or lightning_steps <= 1:
        return
    if manual_steps == 1:
        return
    shown = accumulation_steps if manual_steps is not None else repr(accumulation_steps)
    raise AccumulationConflictError(
        "Gradient accumulation conflict detected!\n"
        f"  Manual accumulation_steps: {shown}\n"
        f"  Lightning accumulate_grad_batches: {lightning_steps}\n"
        "\n"
        "Resolution options:\n"
        "  1. Set accumulation_steps=1 (let Lightning manage)\n"
        "  2. Set trainer.accumulate_grad_batches=1 (use manual)\n"
        "  3. Remove trainer parameter (disable Lightning)"
    )
