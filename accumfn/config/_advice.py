"""``accumfn plan --config``: the effective batch table of a config and learning-rate advice.

No torch: this runs before any training is set up.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..core import DEFAULT_MAX_GRAD_NORM, check_choice, check_count, check_positive_float
from ..errors import ConfigError
from ._settings import AccumulationConfig
from .lr import LR_RULES, lr_factor

__all__ = [
    "clipping_text",
    "format_batch_table",
    "format_lr_advice",
    "plan_text",
    "same_batch_rows",
]

_SOURCES = {
    "linear": "Goyal et al. 2017, for SGD with warmup",
    "sqrt": "often used for Adam/AdamW; Malladi et al. 2022",
}
_MAX_ROWS = 8


def same_batch_rows(batch_size: int, steps: int) -> list[tuple[int, int]]:
    """``(batch_size, steps)`` pairs with the same product, the given one included, at most 8
    (those nearest the given batch size), by batch size."""
    effective = batch_size * steps
    pairs = [(b, effective // b) for b in range(1, effective + 1) if effective % b == 0]
    pairs.sort(key=lambda pair: (abs(pair[0] - batch_size), pair[0]))
    return sorted(pairs[:_MAX_ROWS])


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Numbers right-aligned; the last column (a note) left-aligned."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join([*(c.rjust(w) for c, w in zip(row[:-1], widths, strict=False)), row[-1]]).rstrip()
        for row in cells
    ]


def format_batch_table(config: AccumulationConfig, devices: int = 1, mark: str = "config") -> str:
    """The seed's table: batch_size x gradient_accumulation_steps (x devices) = effective batch.

    A constant window also lists the other splits of the same effective batch; an epoch
    schedule gets a row per phase.
    """
    devices = check_count("devices", devices)
    header = ["batch_size", "gradient_accumulation_steps"]
    header += ["devices"] if devices > 1 else []
    header += ["effective batch size", ""]
    dev: list[object] = [devices] if devices > 1 else []
    steps = config.schedule
    if isinstance(steps, dict):
        table = [
            [config.batch_size, window, *dev, config.batch_size * window * devices, label]
            for label, window in _phases(steps)
        ]
        return "\n".join(_table(header, table))
    table = [
        [b, s, *dev, b * s * devices, f"<- {mark}" if (b, s) == (config.batch_size, steps) else ""]
        for b, s in same_batch_rows(config.batch_size, steps)
    ]
    lines = _table(header, table)
    if len(table) > 1:
        lines += [
            "(one effective batch: a smaller batch_size takes less memory per micro-batch",
            " and more micro-steps per optimizer step; the update is the same)",
        ]
    return "\n".join(lines)


def clipping_text(max_grad_norm: float | None) -> str:
    """``"at max_grad_norm 1.0 (the default)"``: how a config clips, in words."""
    if max_grad_norm is None:
        return "off (max_grad_norm: null)"
    default = " (the default)" if max_grad_norm == DEFAULT_MAX_GRAD_NORM else ""
    return f"at max_grad_norm {max_grad_norm}{default}"


def _phases(steps: dict[int, int]) -> list[tuple[str, int]]:
    """``("epochs 0-3", 8)``: the epochs each window of an epoch schedule covers."""
    starts = sorted(steps)
    bounds = [(0, starts[0] - 1, 1)] if starts[0] > 0 else []
    bounds += [(start, end - 1, steps[start]) for start, end in itertools.pairwise(starts)]
    bounds.append((starts[-1], -1, steps[starts[-1]]))
    labels = {True: "epoch {0}", False: "epochs {0}-{1}"}
    return [
        (labels[first == last].format(first, "" if last < 0 else last), window)
        for first, last, window in bounds
    ]


def _lr_settings(
    config: AccumulationConfig, lr: float | None, base_batch: int | None, rule: str | None
) -> tuple[float, int, str] | None:
    lr = config.learning_rate if lr is None else lr
    base_batch = config.base_batch_size if base_batch is None else base_batch
    if lr is None and base_batch is None:
        return None
    if lr is None or base_batch is None:
        missing = "--lr (or learning_rate)" if lr is None else "--base-batch (or base_batch_size)"
        raise ConfigError(
            f"learning-rate scaling needs {missing}: pass the learning rate and the batch "
            f"size it was tuned at, e.g. --lr 3e-4 --base-batch 8."
        )
    checked = check_positive_float("--lr", lr, allow_none=False)
    assert checked is not None  # allow_none=False
    if rule is None:
        rule = config.lr_scaling if config.lr_scaling != "none" else "linear"
    rule = check_choice("--rule", rule, LR_RULES[1:])
    return checked, check_count("--base-batch", base_batch), rule


def format_lr_advice(
    config: AccumulationConfig,
    *,
    devices: int = 1,
    lr: float | None = None,
    base_batch: int | None = None,
    rule: str | None = None,
) -> str:
    """The learning rate scaled to the effective batch (all devices) by both rules, as advice.

    ``lr``/``base_batch``/``rule`` default to the config's ``learning_rate``,
    ``base_batch_size`` and ``lr_scaling`` (``"linear"`` when that is ``"none"``).
    """
    settings = _lr_settings(config, lr, base_batch, rule)
    if settings is None:
        return (
            "learning rate: pass --lr and --base-batch (the batch size it was tuned at) for the "
            "scaled value."
        )
    base_lr, base, chosen = settings
    steps = config.schedule
    phases = _phases(steps) if isinstance(steps, dict) else [("", steps)]
    lines = []
    for label, window in phases:
        effective = config.batch_size * window * devices
        lines.append(
            f"learning rate {base_lr:g} tuned at batch {base}; effective batch {effective}"
            f"{f' in {label}' if label else ''} (x{effective / base:g}):"
        )
        for name in LR_RULES[1:]:
            factor = lr_factor(base, effective, name)
            picked = "  <-" if name == chosen else ""
            lines.append(
                f"  {name:<6} x{factor:<7.4g} {base_lr * factor:<10.4g} {_SOURCES[name]}{picked}"
            )
    if isinstance(steps, dict):
        lines.append(
            "advice only: accumfn never changes the learning rate; with a window that changes "
            "by epoch, set the learning rate of each phase yourself (accumfn.scale_lr)."
        )
        return "\n".join(lines)
    scaled = base_lr * lr_factor(base, config.batch_size * steps * devices, chosen)
    either = ":" if devices > 1 else ", either"
    lines += [
        f"advice only: accumfn never changes the learning rate. In the config{either}",
        f"  learning_rate: {scaled:.6g}",
    ]
    if devices > 1:
        lines.append(
            f"(config.scaled_learning_rate counts one process's batch; on {devices} devices use "
            f"accumfn.scale_lr(lr, {base}, config.effective_batch_size * {devices}, "
            f"{chosen!r}).)"
        )
        return "\n".join(lines)
    lines += [
        "or",
        f"  learning_rate: {base_lr:g}",
        f"  lr_scaling: {chosen}",
        f"  base_batch_size: {base}",
        "and build the optimizer with lr=config.scaled_learning_rate.",
    ]
    return "\n".join(lines)


def plan_text(
    *,
    config: str | None,
    section: str = "training",
    ignore: Sequence[str] = (),
    batch_size: int | None = None,
    steps: int | None = None,
    target: int | None = None,
    devices: int = 1,
    lr: float | None = None,
    base_batch: int | None = None,
    rule: str | None = None,
) -> str:
    """What ``accumfn plan`` prints for its arguments.

    ``config`` is read by ``AccumulationConfig.from_yaml(config, section, ignore=ignore)``,
    as ``accumfn check --config`` and the user's training script read it.
    """

    def advice(settings: AccumulationConfig) -> str:
        return format_lr_advice(settings, devices=devices, lr=lr, base_batch=base_batch, rule=rule)

    if config is not None:
        if (batch_size, steps, target) != (None, None, None):
            raise ConfigError(
                "--config gives batch_size and gradient_accumulation_steps: leave out "
                "--batch-size, --steps and --target, or leave out --config."
            )
        settings = AccumulationConfig.from_yaml(config, section, ignore=ignore)
        arguments = "".join(
            [repr(config)]
            + ([f", {section!r}"] if section != "training" else [])
            + ([f", ignore={list(ignore)!r}"] if ignore else [])
        )
        code = (
            f"config = AccumulationConfig.from_yaml({arguments})\n"
            f"GradientAccumulator.from_config(optimizer, config)  "
            f"# or accumfn.init(**config.init_kwargs())"
        )
        table = format_batch_table(settings, devices, mark="config")
        clipping = f"clipping: {clipping_text(settings.max_grad_norm)}"
        title = f"{config} [{section or 'whole file'}]"
        return f"{title}\n\n{table}\n{clipping}\n\n{advice(settings)}\n\n{code}"
    if batch_size is not None and steps is not None and target is None:
        settings = AccumulationConfig(gradient_accumulation_steps=steps, batch_size=batch_size)
        table = format_batch_table(settings, devices, mark="this")
        table += f"\nclipping: {clipping_text(settings.max_grad_norm)}"
        code = (
            f"GradientAccumulator(optimizer, accumulation_steps={steps}, batch_size={batch_size})"
        )
        return f"{table}\n\n{advice(settings)}\n\n{code}"
    if batch_size is not None and target is not None and steps is None:
        from .plan import format_plan, plan_window

        window = plan_window(batch_size, target, devices)
        if lr is None and base_batch is None:
            return format_plan(window)
        settings = AccumulationConfig(
            gradient_accumulation_steps=window.window, batch_size=batch_size
        )
        return f"{format_plan(window)}\n\n{advice(settings)}"
    raise ConfigError(
        "give --config FILE, or --batch-size with --steps (the effective batch of that split) "
        "or with --target (the window that reaches it)."
    )
