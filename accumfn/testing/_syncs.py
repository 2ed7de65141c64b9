"""Count host-device syncs with a TorchFunctionMode (works on CPU).

A sync is a call that needs a tensor's value on the host: ``item``, ``bool``, ``float``,
``tolist``, ``cpu``, ``numpy``, printing, data-dependent shapes. On CPU nothing waits, but
each of these would stall the host on an accelerator.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SYNC_CALLS", "HostSyncCounter"]

SYNC_CALLS = frozenset(
    {
        "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
        "__format__", "__repr__", "nonzero", "masked_select", "unique", "equal", "allclose",
        "is_nonzero",
    }
)  # fmt: skip


def _to_host(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    """A blocking copy of a device tensor to the host (``tensor.to("cpu")``).

    ``.to(device)`` of a CPU tensor to the CPU is a no-op, so on CPU runs only explicit
    reads (``item``, ``cpu``, ``bool``...) count.
    """
    source = args[0] if args else None
    if not isinstance(source, torch.Tensor) or source.device.type == "cpu":
        return False
    if kwargs.get("non_blocking") or any(a is True for a in args[2:3]):
        return False
    targets = [*args[1:], kwargs.get("device")]
    return any(
        (isinstance(t, str) and t.startswith("cpu"))
        or (isinstance(t, torch.device) and t.type == "cpu")
        for t in targets
    )


class HostSyncCounter(TorchFunctionMode):
    """Records the tensor calls that read a value back to the host, in order.

    ``with HostSyncCounter() as counter: ...`` then ``counter.calls`` (names) or
    ``counter.by_name()``. Reads of tensors in ``exclude`` (by ``id``) are not counted:
    see ``exclude_optimizer_steps``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.exclude: set[int] = set()

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = str(getattr(func, "__name__", func))
        first = args[0] if args else None
        if not (isinstance(first, torch.Tensor) and id(first) in self.exclude):
            if name in SYNC_CALLS:
                self.calls.append(name)
            elif name == "to" and _to_host(args, kwargs):
                self.calls.append("to(cpu)")
        return func(*args, **kwargs)

    def by_name(self) -> dict[str, int]:
        """Counts of each kind of sync call seen."""
        return dict(Counter(self.calls))

    def exclude_optimizer_steps(self, optimizer: torch.optim.Optimizer) -> None:
        """Ignore reads of the optimizer's ``step`` counters (host-side even for CUDA
        parameters unless ``capturable``). Call after the optimizer's first step."""
        for state in optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                self.exclude.add(id(step))
