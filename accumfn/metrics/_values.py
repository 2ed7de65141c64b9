"""Scalar values of a step: checked without reading the device, reduced, read at commit."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Literal, TypeAlias

import torch

from ..errors import ConfigError

__all__ = ["REDUCTIONS", "Reduce", "ScalarBuffer", "Value", "check_value", "materialize"]

Value: TypeAlias = "float | int | torch.Tensor"
Reduce: TypeAlias = Literal["mean", "sum", "last"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "last")


def check_reduce(name: str, reduce: object) -> Reduce:
    """Return ``reduce`` if it is one of ``REDUCTIONS``, else raise ConfigError."""
    if reduce == "mean":
        return "mean"
    if reduce == "sum":
        return "sum"
    if reduce == "last":
        return "last"
    raise ConfigError(f"{name} must be one of {list(REDUCTIONS)}, got {reduce!r}.")


def check_value(name: str, value: object) -> float | torch.Tensor:
    """A float, or a detached scalar tensor (kept on its device: nothing is read here)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConfigError(
                f"metric {name!r} got a tensor of shape {tuple(value.shape)}; log a scalar "
                f"(reduce it first, e.g. value.mean())."
            )
        if value.is_complex() or value.dtype == torch.bool:
            raise ConfigError(f"metric {name!r} got a {value.dtype} tensor; log a real number.")
        scalar = value.detach().reshape(())
        if not scalar.is_floating_point() or scalar.element_size() < 4:
            scalar = scalar.float()  # sums of half or int values in float32
        return scalar
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"metric {name!r} must be a number or a scalar tensor, got {value!r} of type "
            f"{type(value).__name__}."
        )
    return float(value)


class ScalarBuffer:
    """The values one metric received within one step, reduced as it goes (no device read)."""

    __slots__ = ("count", "last", "reduce", "total")

    def __init__(self, reduce: Reduce) -> None:
        self.reduce: Reduce = reduce
        self.total: float | torch.Tensor = 0.0
        self.last: float | torch.Tensor = 0.0
        self.count = 0

    def add(self, value: float | torch.Tensor) -> None:
        self.count += 1
        self.last = value
        if self.reduce != "last":
            self.total = self.total + value

    def result(self) -> float | torch.Tensor:
        if self.reduce == "last":
            return self.last
        if self.reduce == "sum":
            return self.total
        return self.total / self.count


def materialize(row: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """Read a row's tensors back to the host: one transfer per device, at commit only."""
    out = {name: math.nan for name in row}  # keeps the row's order
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, value in row.items():
        if isinstance(value, torch.Tensor):
            by_device.setdefault(value.device, []).append((name, value))
        else:
            out[name] = float(value)
    for pairs in by_device.values():
        values = torch.stack([tensor for _, tensor in pairs]).tolist()
        out.update((name, float(v)) for (name, _), v in zip(pairs, values, strict=True))
    return out
