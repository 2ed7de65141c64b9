"""``AccumulationConfig``: the accumulation settings of a config file, checked on construction.

An immutable stdlib dataclass, so the config stacks that read dataclasses take it as it is
(OmegaConf/Hydra structured configs, ``HfArgumentParser``, jsonargparse, pydantic). It is
checked with the same checks and messages as ``accumfn.init``; an unknown key is an error
naming the known ones. No torch here: ``accumfn plan`` reads it without importing torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Final

from ..core import (
    DEFAULT_MAX_GRAD_NORM,
    ByEpoch,
    check_choice,
    check_count,
    check_positive_float,
    closest,
)
from ..errors import ConfigError
from ._names import nested_settings, never_skipped, other_name, own_name
from ._outside import refuse_outside
from ._steps import schedule, steps_value
from ._yaml import read_yaml
from .lr import LR_RULES, lr_factor

__all__ = ["AccumulationConfig"]


def _help(text: str, **argparse: Any) -> Any:
    """A field's help, the one text that ``--help`` (HfArgumentParser, jsonargparse) and the
    JSON schema (pydantic) show; ``argparse`` adds arguments HfArgumentParser passes on."""
    return {"help": text, **argparse}


@dataclasses.dataclass(unsafe_hash=True)  # immutable by __setattr__, not frozen=True: below
class AccumulationConfig:
    """Accumulation settings, as ``training:`` in a config file::

        training:
          batch_size: 8
          gradient_accumulation_steps: 4  # effective batch 8 x 4 = 32

    Build the two APIs from it with ``GradientAccumulator.from_config(optimizer, config)``
    or ``accumfn.init(**config.init_kwargs())``. The learning rate is never changed by
    accumfn: build the optimizer with ``config.scaled_learning_rate``.
    """

    gradient_accumulation_steps: int | str = dataclasses.field(
        default=1,
        metadata=_help(
            "the number of micro-batches per optimizer step: an int >= 1, or an epoch "
            "schedule {epoch: steps} such as '{0: 2, 3: 4}' (the last epoch <= the current "
            "one wins, 1 before the first)"
        ),
    )
    batch_size: int = dataclasses.field(
        default=1,
        metadata=_help("the number of samples per micro-batch on each process, an int >= 1"),
    )
    max_grad_norm: float | None = dataclasses.field(
        default=DEFAULT_MAX_GRAD_NORM,
        metadata=_help(
            "the norm the accumulated gradient is clipped to, a number > 0, or null (None) "
            "for no clipping"
        ),
    )
    skip_nonfinite: bool = dataclasses.field(
        default=False,
        metadata=_help("true (skip a window whose gradients are not finite) or false"),
    )
    sync_every_micro_step: bool = dataclasses.field(
        default=False,
        metadata=_help("true (all-reduce on every micro-step under DDP) or false"),
    )
    learning_rate: float | None = dataclasses.field(
        default=None, metadata=_help("the learning rate, a number > 0, or null (None)")
    )
    lr_scaling: str = dataclasses.field(
        default="none",
        metadata=_help(
            "'none', 'linear' or 'sqrt': how scaled_learning_rate scales learning_rate "
            "from base_batch_size to the effective batch",
            choices=LR_RULES,
        ),
    )
    base_batch_size: int | None = dataclasses.field(
        default=None,
        metadata=_help("the batch size learning_rate was tuned at, an int >= 1, or null (None)"),
    )

    __pydantic_config__: ClassVar[dict[str, Any]] = {
        "extra": "forbid",
        "json_schema_extra": lambda schema, cls: _describe(schema),
    }
    """pydantic's settings for this stdlib dataclass (a plain dict, which pydantic 2 reads
    from it): an unknown key is an error, never dropped; the help texts in the JSON schema."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Callable[[Any], Any]) -> Any:
        """pydantic's schema, each field strict: ``true``, ``4.0`` or ``"8"`` is refused,
        never read as 1, 4 or 8. Strict per field, not ``"strict": True`` in the config,
        which would refuse a dict in ``validate_python`` (only an instance passes)."""
        schema = handler(source)
        _strict(schema)
        return schema

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            try:
                checked = _CHECKS[field.name](value)
            except ConfigError as exc:
                raise ConfigError(_with_fix(str(exc), field, value)) from None
            if checked is not value:
                object.__setattr__(self, field.name, checked)
        self._check_lr_scaling()

    def __setattr__(self, name: str, value: object) -> None:
        """A field is set once, checked, by ``__init__``; assigning it again raises
        ``FrozenInstanceError`` (build another with ``dataclasses.replace``). Not declared
        ``frozen=True``: OmegaConf makes a frozen dataclass a read-only node, into which
        Hydra cannot merge a file or a command-line override."""
        if name in self.__dict__:
            raise dataclasses.FrozenInstanceError(
                f"cannot assign to field {name!r}: an AccumulationConfig is checked once, "
                f"when built; use dataclasses.replace(config, {name}=...)."
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}.")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle through the checks: a config pickled by an earlier version (an epoch
        schedule held as a dict) comes back as this version holds it, with its own
        ``max_grad_norm``."""
        type(self).__init__(self, **state)

    def _check_lr_scaling(self) -> None:
        if self.lr_scaling == "none":
            return
        missing = [
            name for name in ("learning_rate", "base_batch_size") if getattr(self, name) is None
        ]
        if missing:
            raise ConfigError(
                f"lr_scaling={self.lr_scaling!r} needs {' and '.join(missing)}: set "
                f"learning_rate to the rate tuned at base_batch_size samples per step, or "
                f"set lr_scaling to 'none'."
            )
        if isinstance(self.gradient_accumulation_steps, str):
            raise ConfigError(
                f"lr_scaling={self.lr_scaling!r} needs one effective batch size, but "
                f"gradient_accumulation_steps changes by epoch "
                f"({self.gradient_accumulation_steps}); set lr_scaling to 'none' and set the "
                f"learning rate of each phase yourself (accumfn.scale_lr helps)."
            )

    # -- what it gives --------------------------------------------------------------------
    @property
    def schedule(self) -> int | dict[int, int]:
        """``gradient_accumulation_steps`` as ``accumfn.init(steps=...)`` takes it: the int,
        or the epoch schedule as ``{epoch: steps}``."""
        return schedule(self.gradient_accumulation_steps)

    def init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``accumfn.init``: ``accumfn.init(**config.init_kwargs())``."""
        return {
            "steps": self.schedule,
            "max_grad_norm": self.max_grad_norm,
            "batch_size": self.batch_size,
            "skip_nonfinite": self.skip_nonfinite,
            "sync_every_micro_step": self.sync_every_micro_step,
        }

    def steps_at(self, epoch: int) -> int:
        """The accumulation window in ``epoch`` (0-based)."""
        epoch = check_count("epoch", epoch, minimum=0)
        steps = self.schedule
        return steps if isinstance(steps, int) else ByEpoch(steps).window(epoch, 0)

    def effective_batch_size_at(self, epoch: int) -> int:
        """``batch_size x steps_at(epoch)``: samples behind one optimizer step, per process."""
        return self.batch_size * self.steps_at(epoch)

    @property
    def effective_batch_size(self) -> int:
        """``batch_size x gradient_accumulation_steps``, per process (times the number of
        data-parallel processes for the whole step). An epoch schedule has one per epoch:
        this raises ConfigError naming ``effective_batch_size_at(epoch)``."""
        steps = self.gradient_accumulation_steps
        if isinstance(steps, str):
            raise ConfigError(
                f"gradient_accumulation_steps changes by epoch ({steps}), so there is no single "
                f"effective batch size: use config.effective_batch_size_at(epoch)."
            )
        return self.batch_size * steps

    @property
    def scaled_learning_rate(self) -> float | None:
        """``learning_rate`` scaled by ``lr_scaling`` from ``base_batch_size`` to
        ``effective_batch_size`` (``learning_rate`` itself with ``"none"``; None if unset).

        Per process: under data parallelism use ``accumfn.scale_lr`` with the effective
        batch of all processes.
        """
        if self.lr_scaling == "none" or self.learning_rate is None:
            return self.learning_rate
        assert self.base_batch_size is not None  # checked on construction
        factor = lr_factor(self.base_batch_size, self.effective_batch_size, self.lr_scaling)
        return self.learning_rate * factor

    # -- where it comes from --------------------------------------------------------------
    @classmethod
    def from_mapping(
        cls, mapping: object, *, ignore: Iterable[str] = (), only_known: bool = False
    ) -> AccumulationConfig:
        """Build from a dict, an OmegaConf ``DictConfig`` or an ``argparse.Namespace``.

        Every key must be a field; ``ignore`` names keys your own code reads (they are
        skipped). ``only_known=True`` skips every other key (an argparse namespace of a whole
        script), except those that would change the training if dropped: another trainer's
        name for a setting (``accumulate_grad_batches``), settings nested one level too
        deep, and a near miss of a field. Those are errors.
        """
        return _build(cls, _plain(mapping), set(ignore), only_known, where="", section=None)

    @classmethod
    def from_yaml(
        cls,
        path: str | os.PathLike[str],
        section: str | None = "training",
        *,
        ignore: Iterable[str] = (),
        only_known: bool = False,
    ) -> AccumulationConfig:
        """Read ``section`` (dotted for nested; None or ``""`` for the whole file, ``--section
        ''`` on the command line) of a YAML file.

        The file is read as YAML 1.2 (``pip install 'accumfn[config]'`` for ruamel.yaml):
        ``3e-4`` is a number, ``010`` is 10, ``1:30`` and ``yes`` are text, and a key written
        twice is an error naming both lines. ``accumfn check --config`` and ``accumfn plan
        --config`` read files with this function, with the same arguments.
        """
        data = read_yaml(Path(path))
        where = str(path)
        document = data
        if section == "":
            section = None
        if section is not None:
            for part in section.split("."):
                if not isinstance(data, Mapping) or part not in data:
                    keys = ", ".join(map(str, data)) if isinstance(data, Mapping) else "none"
                    raise ConfigError(
                        f"{where} has no {section!r} section (top-level keys: {keys}); put the "
                        f"accumulation settings under '{section}:', or pass section= naming "
                        f"the section that holds them, None for the whole file (accumfn "
                        f"check/plan: --section NAME, or --section '' for the whole file)."
                    )
                data = data[part]
            names = [field.name for field in dataclasses.fields(cls)]
            refuse_outside(document, section, names, set(ignore), where)
            where = f"{where} [{section}]"
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{where} must be a mapping of settings (key: value lines), got "
                f"{data!r} of type {type(data).__name__}; e.g. 'batch_size: 8' and "
                f"'gradient_accumulation_steps: 4' on their own lines."
            )
        return _build(cls, dict(data), set(ignore), only_known, where=where, section=section)


def _flag(name: str) -> Callable[[object], bool]:
    def check(value: object) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be True or False, got {value!r}.")
        return value

    return check


def _optional_count(name: str) -> Callable[[object], int | None]:
    return lambda value: None if value is None else check_count(name, value)


def _learning_rate(value: object) -> float | None:
    return None if value is None else check_positive_float("learning_rate", value, allow_none=False)


_CHECKS: Final[dict[str, Callable[[object], object]]] = {
    "gradient_accumulation_steps": steps_value,
    "batch_size": lambda value: check_count("batch_size", value),
    "max_grad_norm": lambda value: check_positive_float("max_grad_norm", value, allow_none=True),
    "skip_nonfinite": _flag("skip_nonfinite"),
    "sync_every_micro_step": _flag("sync_every_micro_step"),
    "learning_rate": _learning_rate,
    "lr_scaling": lambda value: check_choice("lr_scaling", value, LR_RULES),
    "base_batch_size": _optional_count("base_batch_size"),
}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_YAML11_BOOLEANS: Final = frozenset({"yes", "no", "on", "off", "y", "n"})


def _with_fix(message: str, field: dataclasses.Field[Any], value: object) -> str:
    """The core's message, then what the field means, and a word on quoted numbers."""
    quoted = ""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        quoted = f" Write it as a number, without quotes ({field.name}: {value.strip()})."
    elif isinstance(value, str) and value.strip().lower() in _YAML11_BOOLEANS:
        quoted = f" YAML 1.2 reads {value.strip()} as text: write true or false."
    return f"{message} {field.name} is {field.metadata['help']}.{quoted}"


def _describe(schema: dict[str, Any]) -> None:
    """Each field's help as its description in pydantic's JSON schema, and lr_scaling's
    choices as an enum."""
    properties = schema.get("properties", {})
    for field in dataclasses.fields(AccumulationConfig):
        if field.name in properties:
            properties[field.name]["description"] = field.metadata["help"]
    if "lr_scaling" in properties:
        properties["lr_scaling"]["enum"] = list(LR_RULES)


def _strict(node: object) -> None:
    """Each int, float, bool and str in a pydantic core schema made strict, in place."""
    if isinstance(node, dict):
        if node.get("type") in ("int", "float", "bool", "str"):
            node["strict"] = True
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)


def _docstring_args() -> str:
    """The fields' help as an ``Args:`` section, where jsonargparse's ``--help`` reads it."""
    fields = dataclasses.fields(AccumulationConfig)
    rows = [f"        {field.name}: {field.metadata['help']}" for field in fields]
    return "\n    Args:\n" + "\n".join(rows) + "\n"


AccumulationConfig.__doc__ = f"{AccumulationConfig.__doc__}{_docstring_args()}"


def _plain(mapping: object) -> dict[str, Any]:
    """A plain dict of ``mapping``: OmegaConf resolved, argparse namespaces as their vars."""
    module = type(mapping).__module__
    if module.startswith("omegaconf"):
        omegaconf = importlib.import_module("omegaconf")
        try:
            mapping = omegaconf.OmegaConf.to_container(mapping, resolve=True)
        except omegaconf.errors.OmegaConfBaseException as exc:
            raise ConfigError(f"cannot resolve the OmegaConf config: {exc}") from exc
    elif not isinstance(mapping, Mapping) and hasattr(mapping, "__dict__"):
        mapping = vars(mapping)
    if not isinstance(mapping, Mapping):
        raise ConfigError(
            f"AccumulationConfig.from_mapping needs a mapping (dict, OmegaConf DictConfig, "
            f"argparse.Namespace), got {type(mapping).__name__}; for a file use "
            f"AccumulationConfig.from_yaml(path)."
        )
    return dict(mapping)


def _build(
    cls: type[AccumulationConfig],
    data: dict[Any, Any],
    ignore: set[str],
    only_known: bool,
    where: str,
    section: str | None,
) -> AccumulationConfig:
    names = [field.name for field in dataclasses.fields(cls)]
    prefix = f"{where}: " if where else ""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in names:
            kwargs[key] = value
        elif key in ignore or (only_known and not never_skipped(key, value, names, data)):
            continue
        else:
            raise ConfigError(f"{prefix}{_unknown(str(key), value, names, section)}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def _unknown(key: str, value: object, names: list[str], section: str | None) -> str:
    """What is wrong with an unknown key, and how to fix it."""
    nested = nested_settings(value, names)
    if nested:
        inner = f"{section}.{key}" if section else key
        return (
            f"key {key!r} holds {', '.join(nested)}: the settings are nested one level too "
            f"deep. Move them up next to {key!r} (and delete it), or read that section: "
            f"section={inner!r} (accumfn check/plan: --section {inner})."
        )
    renamed = other_name(key, value)
    if renamed is not None:
        return renamed
    field = own_name(key, names)
    if field is not None:
        return (
            f"key {key!r} with value {value!r}: did you mean {field!r}? accumfn's keys are "
            f"written in lower case with underscores, as the field names (never a setting "
            f"dropped silently): write {field}: {value!r}."
        )
    return (
        f"unknown key {key!r} with value {value!r}{closest(key, names)}. Known keys: "
        f"{', '.join(names)}. Fix the spelling, or pass ignore=[{key!r}] (accumfn check/plan: "
        f"--ignore {key}) for a key your own code reads."
    )


def init_kwargs_of(config: object) -> dict[str, Any]:
    """``config.init_kwargs()``; ConfigError unless ``config`` is an AccumulationConfig."""
    if not isinstance(config, AccumulationConfig):
        raise ConfigError(
            f"config must be an AccumulationConfig, got {type(config).__name__}; build it "
            f"with AccumulationConfig.from_yaml(path) or AccumulationConfig.from_mapping(d)."
        )
    return config.init_kwargs()
