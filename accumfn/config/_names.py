"""Keys a config section may hold that are not ``AccumulationConfig`` fields, and what each means.

``OTHER_NAMES`` is the one table of other trainers' names for accumfn's settings. A file
that uses one (``accumulate_grad_batches: 4``) is refused with accumfn's name, never read
as if the key were not there: every reader (``from_yaml``, ``from_mapping``, ``accumfn check``
and ``accumfn plan``) refuses it, ``only_known=True`` too.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any, Final, NamedTuple

__all__ = [
    "OTHER_NAMES",
    "OtherName",
    "nested_settings",
    "never_skipped",
    "other_name",
    "own_name",
]


class OtherName(NamedTuple):
    field: str
    """accumfn's field for it."""
    whose: str
    """Who uses the name, for the message."""
    note: str = ""
    """What differs, where the name does not mean the same thing as the field."""
    generic: bool = False
    """A common word (``lr``, ``steps``) that ``only_known=True`` may skip: it may mean
    something else in a whole script's arguments."""


_EFFECTIVE = (
    "{key!r} is {whose}'s effective batch (micro-batch x accumulation steps x processes); "
    "accumfn reads batch_size, the samples of one micro-batch on each process, and "
    "gradient_accumulation_steps: `accumfn plan --batch-size B --target T` gives the window "
    "that reaches a target"
)

_ALGORITHM = (
    "{key!r} is {whose}'s choice between clipping by norm and by value; accumfn clips the "
    "accumulated gradient by its norm, at max_grad_norm (a number, or null for none), and "
    "GradientAccumulator(clip_value=...) clips by value: write max_grad_norm, and delete "
    "{key!r}"
)

OTHER_NAMES: Final[dict[str, OtherName]] = {
    "accumulate_grad_batches": OtherName("gradient_accumulation_steps", "Lightning's Trainer"),
    "accumulation_steps": OtherName("gradient_accumulation_steps", "GradientAccumulator"),
    "grad_accum_steps": OtherName("gradient_accumulation_steps", "many training scripts"),
    "steps": OtherName("gradient_accumulation_steps", "accumfn.init", generic=True),
    "per_device_train_batch_size": OtherName("batch_size", "Hugging Face TrainingArguments"),
    "train_micro_batch_size_per_gpu": OtherName("batch_size", "DeepSpeed"),
    "micro_batch_size": OtherName("batch_size", "Megatron-LM and axolotl"),
    "local_batch_size": OtherName("batch_size", "torchtitan"),
    "train_batch_size": OtherName("batch_size", "DeepSpeed", note=_EFFECTIVE),
    "global_batch_size": OtherName("batch_size", "torchtitan and Megatron-LM", note=_EFFECTIVE),
    "gradient_clip_val": OtherName("max_grad_norm", "Lightning's Trainer"),
    "gradient_clipping": OtherName("max_grad_norm", "DeepSpeed"),
    "clip_grad_norm": OtherName("max_grad_norm", "torchtune"),
    "grad_clip": OtherName("max_grad_norm", "nanoGPT"),
    "max_norm": OtherName("max_grad_norm", "torchtitan"),
    "clip_grad": OtherName("max_grad_norm", "timm and Megatron-LM"),
    "clip_norm": OtherName("max_grad_norm", "fairseq"),
    "grad_norm_clip": OtherName("max_grad_norm", "minGPT"),
    "gradient_clip_algorithm": OtherName("max_grad_norm", "Lightning's Trainer", note=_ALGORITHM),
    "per_gpu_train_batch_size": OtherName("batch_size", "older Hugging Face TrainingArguments"),
    "device_train_microbatch_size": OtherName("batch_size", "Composer"),
    "global_train_batch_size": OtherName("batch_size", "Composer", note=_EFFECTIVE),
    "accum_iter": OtherName("gradient_accumulation_steps", "the MAE and DeiT training scripts"),
    "update_freq": OtherName("gradient_accumulation_steps", "fairseq"),
    "lr": OtherName("learning_rate", "the optimizers", generic=True),
    "base_batch": OtherName("base_batch_size", "accumfn plan --base-batch", generic=True),
}


def _other(key: object) -> OtherName | None:
    return OTHER_NAMES.get(key.lower().replace("-", "_")) if isinstance(key, str) else None


def other_name(key: str, value: object) -> str | None:
    """What to write instead of another trainer's name for a setting, or None if ``key``
    is none."""
    other = _other(key)
    if other is None:
        return None
    if other.note:
        return f"key {key!r} with value {value!r}: {other.note.format(key=key, whose=other.whose)}."
    return (
        f"key {key!r} with value {value!r}: did you mean {other.field!r}? {key!r} is what "
        f"{other.whose} calls it, and accumfn reads only its own names (never a setting "
        f"dropped silently): write {other.field}: {value!r}."
    )


def own_name(key: object, names: Iterable[str]) -> str | None:
    """The field ``key`` writes in another case or with dashes (``Max_Grad_Norm``,
    ``gradient-accumulation-steps``), or None."""
    if not isinstance(key, str):
        return None
    normal = key.lower().replace("-", "_")
    return normal if normal != key and normal in set(names) else None


def nested_settings(value: object, names: Iterable[str]) -> list[str]:
    """The keys of ``value`` that are fields (in any case) or other trainers' names for
    them: settings written one level too deep."""
    if not isinstance(value, Mapping):
        return []
    known = set(names)
    return [
        str(key) for key in value if key in known or own_name(key, known) or _other(key) is not None
    ]


def never_skipped(key: object, value: object, names: list[str], data: Mapping[Any, Any]) -> bool:
    """Whether ``only_known=True`` must still refuse ``key``: another trainer's name for a
    setting, settings nested one level too deep, or a near miss of a field ``data`` does
    not set."""
    other = _other(key)
    if other is not None:
        return not other.generic
    if own_name(key, names) or nested_settings(value, names):
        return True
    unset = [name for name in names if name not in data]
    return isinstance(key, str) and bool(difflib.get_close_matches(key, unset, n=1, cutoff=0.85))
