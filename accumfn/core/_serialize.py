"""AccumState <-> plain dict, strict about format, keys and types."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import AccumError, StateFormatError
from ._schedule import ByEpoch, ByStep, CallerClosed, Constant, Schedule
from ._state import AccumConfig, AccumState, Normalization

__all__ = ["FORMAT", "state_from_dict", "state_to_dict"]

FORMAT = 1
"""Version of the dict layout written by ``to_dict``; bumped on any incompatible change."""

_OPT_FLOAT = (float, type(None))
_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "schedule": (dict,),
    "max_grad_norm": _OPT_FLOAT,
    "batch_size": (int,),
    "skip_nonfinite": (bool,),
    "sync_every_micro_step": (bool,),
    "accum_dtype": (str, type(None)),
}
_CONFIG_DEFAULTS: dict[str, object] = {"accum_dtype": None}
"""Keys added to format 1 after its first release, with the value older dicts imply."""
_STATE_KEYS: dict[str, tuple[type, ...]] = {
    "format": (int,),
    "config": (dict,),
    "window": (int,),
    "micro_step": (int,),
    "window_norm": (str, type(None)),
    "window_items": (int,),
    "closed": (bool,),
    "grad_scale": (float,),
    "epoch": (int,),
    "total_micro_steps": (int,),
    "optimizer_steps": (int,),
    "skipped_steps": (int,),
    "dropped_micro_steps": (int,),
    "last_grad_norm": _OPT_FLOAT,
    "window_scaled": (bool, type(None)),
    "window_device_counts": (int,),
}
_STATE_DEFAULTS: dict[str, object] = {"window_scaled": None, "window_device_counts": 0}
"""State keys added to format 1 after its first release, with the value older dicts imply
(None: not recorded; 0: no count kept on the device)."""


def state_to_dict(state: AccumState) -> dict[str, Any]:
    config = state.config
    return {
        "format": FORMAT,
        "config": {
            "schedule": config.schedule.to_dict(),
            "max_grad_norm": config.max_grad_norm,
            "batch_size": config.batch_size,
            "skip_nonfinite": config.skip_nonfinite,
            "sync_every_micro_step": config.sync_every_micro_step,
            "accum_dtype": config.accum_dtype,
        },
        "window": state.window,
        "micro_step": state.micro_step,
        "window_norm": None if state.window_norm is None else state.window_norm.value,
        "window_items": state.window_items,
        "closed": state.closed,
        "grad_scale": state.grad_scale,
        "epoch": state.epoch,
        "total_micro_steps": state.total_micro_steps,
        "optimizer_steps": state.optimizer_steps,
        "skipped_steps": state.skipped_steps,
        "dropped_micro_steps": state.dropped_micro_steps,
        "last_grad_norm": state.last_grad_norm,
        "window_scaled": state.window_scaled,
        "window_device_counts": state.window_device_counts,
    }


def _type_ok(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True  # JSON writes 2.0 as 2
    return isinstance(value, types)


def _check_keys(where: str, data: Mapping[str, Any], spec: Mapping[str, tuple[type, ...]]) -> None:
    missing = sorted(set(spec) - set(data))
    extra = sorted(set(data) - set(spec), key=str)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise StateFormatError(
            f"{where} does not match format {FORMAT}: {', '.join(parts)}. "
            f"Pass the dict that AccumState.to_dict() wrote, unchanged."
        )
    for key, types in spec.items():
        if not _type_ok(data[key], types):
            names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            raise StateFormatError(
                f"{where}[{key!r}] must be {names}, got {data[key]!r} of type "
                f"{type(data[key]).__name__}. Pass the dict that AccumState.to_dict() wrote, "
                f"unchanged."
            )


def _schedule(data: Mapping[str, Any], given: object) -> Schedule | object:
    kind = data.get("kind")
    if kind == "callable":
        if given is None or not callable(given):
            raise StateFormatError(
                f"this state was saved with a callable accumulation schedule "
                f"({data.get('name', '?')}), which cannot be serialized; pass it again: "
                f"AccumState.from_dict(data, schedule=your_function)."
            )
        return ByStep(given)
    if given is not None:
        raise StateFormatError(
            f"schedule= is only for states saved with a callable schedule; this one was saved "
            f"with a {kind!r} schedule, which the dict already holds."
        )
    if kind == "caller" and set(data) == {"kind"}:
        return CallerClosed()
    if kind == "constant" and set(data) == {"kind", "steps"}:
        return Constant(data["steps"])
    if kind == "epochs" and set(data) == {"kind", "table"} and isinstance(data["table"], list):
        rows = data["table"]
        if all(isinstance(row, list) and len(row) == 2 for row in rows):
            return ByEpoch({row[0]: row[1] for row in rows})
    raise StateFormatError(
        f"config['schedule'] is not a schedule of format {FORMAT}: {dict(data)!r}. Pass the "
        f"dict that AccumState.to_dict() wrote, unchanged."
    )


def state_from_dict(data: object, *, schedule: object = None) -> AccumState:
    if not isinstance(data, Mapping):
        raise StateFormatError(
            f"expected the dict written by AccumState.to_dict(), got {type(data).__name__}; "
            f"pass that dict, unchanged."
        )
    version = data.get("format")
    if version != FORMAT:
        raise StateFormatError(
            f"state format {version!r} is not supported (this accumfn reads format {FORMAT}); "
            f"a newer accumfn wrote it, or it is not an accumfn state. Upgrade accumfn or "
            f"start from a fresh state."
        )
    data = {**_STATE_DEFAULTS, **data}
    _check_keys("state", data, _STATE_KEYS)
    cfg = data["config"]
    if isinstance(cfg, Mapping):
        cfg = {**_CONFIG_DEFAULTS, **cfg}
    _check_keys("state['config']", cfg, _CONFIG_KEYS)
    norm = data["window_norm"]
    try:
        config = AccumConfig(
            schedule=_schedule(cfg["schedule"], schedule),
            max_grad_norm=cfg["max_grad_norm"],
            batch_size=cfg["batch_size"],
            skip_nonfinite=cfg["skip_nonfinite"],
            sync_every_micro_step=cfg["sync_every_micro_step"],
            accum_dtype=cfg["accum_dtype"],
        )
        return AccumState(
            config=config,
            window=data["window"],
            micro_step=data["micro_step"],
            window_norm=None if norm is None else Normalization(norm),
            window_items=data["window_items"],
            closed=data["closed"],
            grad_scale=float(data["grad_scale"]),
            epoch=data["epoch"],
            total_micro_steps=data["total_micro_steps"],
            optimizer_steps=data["optimizer_steps"],
            skipped_steps=data["skipped_steps"],
            dropped_micro_steps=data["dropped_micro_steps"],
            last_grad_norm=None
            if data["last_grad_norm"] is None
            else float(data["last_grad_norm"]),
            window_scaled=data["window_scaled"],
            window_device_counts=data["window_device_counts"],
        )
    except StateFormatError:
        raise
    except (AccumError, ValueError) as exc:
        detail = str(exc).rstrip(".")
        raise StateFormatError(
            f"state values are inconsistent: {detail}. Pass the dict that AccumState.to_dict() "
            f"wrote, unchanged."
        ) from exc
