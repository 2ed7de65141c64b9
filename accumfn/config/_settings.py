"""``AccumulationConfig``: the accumulation settings of a config file, checked on construction.

A frozen stdlib dataclass, so the config stacks that read dataclasses take it as it is
(OmegaConf/Hydra structured configs, ``HfArgumentParser``, jsonargparse, pydantic). It is
checked with the same checks and messages as ``accumfn.init``; an unknown key is an error
naming the known ones. No torch here: ``accumfn plan`` reads it without importing torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from ..core import ByEpoch, Constant, check_choice, check_count, check_positive_float, closest
from ..errors import ConfigError, MissingDependencyError
from .lr import LR_RULES, LRRule, lr_factor

__all__ = ["AccumulationConfig"]

_ALIASES: Final = {
    "accumulate_grad_batches": "gradient_accumulation_steps",
    "accumulation_steps": "gradient_accumulation_steps",
    "grad_accum_steps": "gradient_accumulation_steps",
    "steps": "gradient_accumulation_steps",
    "per_device_train_batch_size": "batch_size",
    "micro_batch_size": "batch_size",
    "gradient_clip_val": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "lr": "learning_rate",
    "base_batch": "base_batch_size",
}
"""Names other trainers use, suggested when one of them comes in as an unknown key."""


def _help(text: str) -> Any:
    return {"help": text}


@dataclasses.dataclass(frozen=True)
class AccumulationConfig:
    """Accumulation settings, as ``training:`` in a config file::

        training:
          batch_size: 8
          gradient_accumulation_steps: 4  # effective batch 8 x 4 = 32

    Build the two APIs from it with ``GradientAccumulator.from_config(optimizer, config)``
    or ``accumfn.init(**config.init_kwargs())``. The learning rate is never changed by
    accumfn: build the optimizer with ``config.scaled_learning_rate``.
    """

    gradient_accumulation_steps: int | dict[int, int] = dataclasses.field(
        default=1,
        metadata=_help(
            "the number of micro-batches per optimizer step: an int >= 1, or {epoch: steps} "
            "(the last key <= epoch wins, 1 before the first key)"
        ),
    )
    batch_size: int = dataclasses.field(
        default=1,
        metadata=_help("the number of samples per micro-batch on each process, an int >= 1"),
    )
    max_grad_norm: float | None = dataclasses.field(
        default=None,
        metadata=_help(
            "the norm the accumulated gradient is clipped to, a number > 0, or null (None)"
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
    lr_scaling: LRRule = dataclasses.field(
        default="none",
        metadata=_help(
            "'none', 'linear' or 'sqrt': how scaled_learning_rate scales learning_rate "
            "from base_batch_size to the effective batch"
        ),
    )
    base_batch_size: int | None = dataclasses.field(
        default=None,
        metadata=_help("the batch size learning_rate was tuned at, an int >= 1, or null (None)"),
    )

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
        if isinstance(self.gradient_accumulation_steps, dict):
            raise ConfigError(
                f"lr_scaling={self.lr_scaling!r} needs one effective batch size, but "
                f"gradient_accumulation_steps changes by epoch "
                f"({self.gradient_accumulation_steps}); set lr_scaling to 'none' and set the "
                f"learning rate of each phase yourself (accumfn.scale_lr helps)."
            )

    # -- what it gives --------------------------------------------------------------------
    def init_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``accumfn.init``: ``accumfn.init(**config.init_kwargs())``."""
        steps = self.gradient_accumulation_steps
        return {
            "steps": dict(steps) if isinstance(steps, dict) else steps,
            "max_grad_norm": self.max_grad_norm,
            "batch_size": self.batch_size,
            "skip_nonfinite": self.skip_nonfinite,
            "sync_every_micro_step": self.sync_every_micro_step,
        }

    def steps_at(self, epoch: int) -> int:
        """The accumulation window in ``epoch`` (0-based)."""
        epoch = check_count("epoch", epoch, minimum=0)
        steps = self.gradient_accumulation_steps
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
        if isinstance(steps, dict):
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
        script) except one that looks like a misspelled field, which is still an error.
        """
        return _build(cls, _plain(mapping), set(ignore), only_known, where="")

    @classmethod
    def from_yaml(
        cls,
        path: str | os.PathLike[str],
        section: str | None = "training",
        *,
        ignore: Iterable[str] = (),
        only_known: bool = False,
    ) -> AccumulationConfig:
        """Read ``section`` (dotted for nested, None for the whole file) of a YAML file.

        Needs PyYAML (``pip install 'accumfn[config]'``). Numbers such as ``3e-4`` are read
        as numbers (YAML 1.2), not as strings as PyYAML's default does.
        """
        data = _read_yaml(Path(path))
        where = str(path)
        if section is not None:
            for part in section.split("."):
                if not isinstance(data, Mapping) or part not in data:
                    keys = ", ".join(map(str, data)) if isinstance(data, Mapping) else "none"
                    raise ConfigError(
                        f"{where} has no {section!r} section (top-level keys: {keys}); put the "
                        f"accumulation settings under '{section}:', or pass section= naming "
                        f"the section that holds them (None for the whole file)."
                    )
                data = data[part]
            where = f"{where} [{section}]"
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"{where} must be a mapping of settings (key: value lines), got "
                f"{data!r} of type {type(data).__name__}; e.g. 'batch_size: 8' and "
                f"'gradient_accumulation_steps: 4' on their own lines."
            )
        return _build(cls, dict(data), set(ignore), only_known, where=where)


def _steps(value: object) -> int | dict[int, int]:
    if value is None:
        raise ConfigError(
            "gradient_accumulation_steps: null (windows the training loop closes itself) "
            "cannot come from a config: whether a loop closes its windows is part of its code, "
            "which must pass is_final_batch=True on each window's last micro-batch; a config "
            "that said so to a loop that does not would never step. Pass "
            "accumulation_steps=None to GradientAccumulator (or accumfn.init(steps=None)) in "
            "that loop, and leave gradient_accumulation_steps out of the config."
        )
    if isinstance(value, Mapping):
        return dict(ByEpoch(value).table)
    if callable(value) or isinstance(value, (Constant, ByEpoch)):
        raise ConfigError(
            f"gradient_accumulation_steps must be an int or {{epoch: steps}} in a config, got "
            f"{value!r}; a callable schedule cannot be written in a config file: pass it to "
            f"accumfn.init(steps=...) or GradientAccumulator(...) directly."
        )
    return check_count("gradient_accumulation_steps", value)


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
    "gradient_accumulation_steps": _steps,
    "batch_size": lambda value: check_count("batch_size", value),
    "max_grad_norm": lambda value: check_positive_float("max_grad_norm", value, allow_none=True),
    "skip_nonfinite": _flag("skip_nonfinite"),
    "sync_every_micro_step": _flag("sync_every_micro_step"),
    "learning_rate": _learning_rate,
    "lr_scaling": lambda value: check_choice("lr_scaling", value, LR_RULES),
    "base_batch_size": _optional_count("base_batch_size"),
}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _with_fix(message: str, field: dataclasses.Field[Any], value: object) -> str:
    """The core's message, then what the field means, and a word on quoted numbers."""
    quoted = ""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        quoted = f" Write it as a number, without quotes ({field.name}: {value.strip()})."
    return f"{message} {field.name} is {field.metadata['help']}.{quoted}"


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
) -> AccumulationConfig:
    names = [field.name for field in dataclasses.fields(cls)]
    prefix = f"{where}: " if where else ""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in names:
            kwargs[key] = value
        elif key in ignore or (only_known and not _misspelled(key, names, data)):
            continue
        else:
            hint = _suggestion(str(key), names)
            raise ConfigError(
                f"{prefix}unknown key {key!r} with value {value!r}{hint}. Known keys: "
                f"{', '.join(names)}. Fix the spelling, or pass ignore=[{str(key)!r}] for a "
                f"key your own code reads."
            )
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def _suggestion(key: str, names: list[str]) -> str:
    alias = _ALIASES.get(key.lower().replace("-", "_"))
    if alias is not None:
        return f" (did you mean {alias!r}? accumfn's name for it)"
    return closest(key, names)


def _misspelled(key: object, names: list[str], data: Mapping[Any, Any]) -> bool:
    """Whether ``key`` is a near miss of a field that ``data`` does not set."""
    unset = [name for name in names if name not in data]
    return isinstance(key, str) and bool(difflib.get_close_matches(key, unset, n=1, cutoff=0.85))


_YAML12_FLOAT = re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][-+]?\d+)?$")


def _loader(yaml: Any) -> Any:
    """PyYAML's SafeLoader with YAML 1.2 floats: ``3e-4`` is a number, not a string."""
    loader: Any = type("Loader", (yaml.SafeLoader,), {})
    loader.yaml_implicit_resolvers = {
        key: list(value) for key, value in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+0123456789."))
    return loader


def _read_yaml(path: Path) -> Any:
    try:
        yaml = importlib.import_module("yaml")
    except ImportError as exc:
        raise MissingDependencyError(
            "reading a YAML config needs PyYAML, which is not installed: run "
            "pip install 'accumfn[config]' (or pip install pyyaml), or load the file "
            "yourself and pass the dict to AccumulationConfig.from_mapping."
        ) from exc
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        where = "" if path.is_absolute() else f"; the current directory is {os.getcwd()!r}"
        raise ConfigError(
            f"no config file at {str(path)!r} (it {state}{where}): check the path, e.g. "
            f"examples/config.yaml."
        )
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_loader(yaml))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(
            f"{str(path)!r} is not valid YAML{line}: {problem}; fix the file (indent nested "
            f"keys with spaces, one 'key: value' per line)."
        ) from exc
    if data is None:
        raise ConfigError(
            f"{str(path)!r} is empty; write the settings in it, e.g. 'training:' then "
            f"'  batch_size: 8' and '  gradient_accumulation_steps: 4'."
        )
    return data
