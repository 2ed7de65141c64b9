"""All-reduce calls and wall time per window on 2 DDP gloo ranks: accumfn vs a naive loop.

Besides the gradient all-reduces it counts the all-gathers (accumfn's window header: one
small int64 row per rank, the exchange in which the ranks agree on the window).

The naive loop is the one people write first: ``(loss / N).backward()`` on every micro-step,
so DDP all-reduces every backward. accumfn tells DDP to sync only the window's last
backward. Same model, data and optimizer; the two runs alternate, each repeat times a few
windows after a warm-up window, and the figures are medians over repeats (slowest rank).

Run: python benchmarks/ddp_allreduce.py [--repeats 5] [--out benchmarks/results/ddp_allreduce.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import accumfn

__all__ = ["main", "run"]

WORLD = 2
WIDTH = 512  # 4 linear layers of 512 x 512: about 1.05 M parameters, 4.2 MB of fp32 gradient
MICRO_BATCH = 8
WINDOW = 8  # micro-steps per window
WINDOWS = 3  # timed windows per repeat
BUCKET_CAP_MB = 25.0  # DDP's default


_GATHERS = [name for name in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, name)]


class _Counter:
    """Counts gradient all-reduce calls (DDP buckets through the comm hook, and explicit
    all_reduce) and all-gather calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.gathers = 0
        self._in_hook = False
        self._real = dist.all_reduce
        self._real_gathers = {name: getattr(dist, name) for name in _GATHERS}

    def patch(self) -> None:
        dist.all_reduce = self.all_reduce  # type: ignore[assignment]
        for name, real in self._real_gathers.items():
            setattr(dist, name, self._gather(real))

    def unpatch(self) -> None:
        dist.all_reduce = self._real  # type: ignore[assignment]
        for name, real in self._real_gathers.items():
            setattr(dist, name, real)

    def _gather(self, real: Any) -> Any:
        def gather(*args: Any, **kwargs: Any) -> Any:
            self.gathers += 1
            return real(*args, **kwargs)

        return gather

    def hook(self, group: dist.ProcessGroup, bucket: dist.GradBucket) -> Any:
        self.calls += 1
        self._in_hook = True
        try:
            return default_hooks.allreduce_hook(group, bucket)
        finally:
            self._in_hook = False

    def all_reduce(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self._in_hook:
            self.calls += 1
        return self._real(tensor, *args, **kwargs)


def _model(counter: _Counter) -> DistributedDataParallel:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(WIDTH, WIDTH), nn.GELU()]
    model = DistributedDataParallel(nn.Sequential(*layers[:-1]), bucket_cap_mb=BUCKET_CAP_MB)
    model.register_comm_hook(None, lambda group, bucket: counter.hook(group, bucket))
    return model


def _data(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(rank)
    return [
        (torch.randn(MICRO_BATCH, WIDTH, generator=g), torch.randn(MICRO_BATCH, WIDTH, generator=g))
        for _ in range(WINDOW)
    ]


def _naive_window(model: nn.Module, optimizer: torch.optim.Optimizer, data: Any) -> None:
    for x, y in data:
        (nn.functional.mse_loss(model(x), y) / WINDOW).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _accumfn_window(model: nn.Module, accumulator: accumfn.GradientAccumulator, data: Any) -> None:
    for x, y in data:
        accumulator.accumulate(nn.functional.mse_loss(model(x), y), model)


def _measure(rank: int, method: str) -> tuple[float, float, float]:
    """(all-reduce calls, all-gather calls, seconds) per window of ``method`` on this rank."""
    counter = _Counter()
    model = _model(counter)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    data = _data(rank)
    if method == "accumfn":
        accumulator = accumfn.GradientAccumulator(optimizer, WINDOW, max_grad_norm=None)
        accumulator.prepare(model)

        def window() -> None:
            _accumfn_window(model, accumulator, data)
    else:

        def window() -> None:
            _naive_window(model, optimizer, data)

    counter.patch()
    try:
        window()  # warm-up: DDP rebuilds its buckets after the first round
        counter.calls = counter.gathers = 0
        dist.barrier()
        start = time.perf_counter()
        for _ in range(WINDOWS):
            window()
        elapsed = time.perf_counter() - start
    finally:
        counter.unpatch()
    slowest = torch.tensor([elapsed], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return counter.calls / WINDOWS, counter.gathers / WINDOWS, float(slowest) / WINDOWS


def _worker(rank: int, port: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=120),
    )
    try:
        calls: dict[str, list[float]] = {"accumfn": [], "naive": []}
        gathers: dict[str, list[float]] = {"accumfn": [], "naive": []}
        seconds: dict[str, list[float]] = {"accumfn": [], "naive": []}
        for repeat in range(repeats):
            order = ("accumfn", "naive") if repeat % 2 == 0 else ("naive", "accumfn")
            for method in order:
                n, g, s = _measure(rank, method)
                calls[method].append(n)
                gathers[method].append(g)
                seconds[method].append(s)
        if rank == 0:
            result = {
                "allreduce_per_window_accumfn": statistics.median(calls["accumfn"]),
                "allreduce_per_window_naive": statistics.median(calls["naive"]),
                "allgather_per_window_accumfn": statistics.median(gathers["accumfn"]),
                "allgather_per_window_naive": statistics.median(gathers["naive"]),
                "window_ms_accumfn": 1e3 * statistics.median(seconds["accumfn"]),
                "window_ms_naive": 1e3 * statistics.median(seconds["naive"]),
            }
            result["ratio"] = result["window_ms_naive"] / result["window_ms_accumfn"]
            result["micro_steps_per_window"] = float(WINDOW)
            result["repeats"] = float(repeats)
            Path(out, "result.json").write_text(json.dumps(result))
        dist.barrier()  # no rank tears down gloo while the other still talks to it
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(repeats: int = 5) -> dict[str, float]:
    """Measure on 2 gloo ranks (127.0.0.1). ``ratio`` is naive ms / accumfn ms per window."""
    timeout = 60.0 + 30.0 * repeats
    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(
            _worker,
            args=(_free_port(), repeats, out),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        assert context is not None
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                    process.join()
                raise TimeoutError(f"benchmark ranks did not finish within {timeout:.0f} s")
        result: dict[str, float] = json.loads(Path(out, "result.json").read_text())
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ddp_allreduce.json"))
    args = parser.parse_args(argv)
    result = run(args.repeats)
    print(f"DDP, {WORLD} gloo ranks on CPU, {WINDOW} micro-steps per window (medians)")
    print(f"{'':12} {'all-reduce calls/window':>24} {'all-gathers/window':>19} {'ms/window':>10}")
    for method in ("accumfn", "naive"):
        calls = result[f"allreduce_per_window_{method}"]
        gathers = result[f"allgather_per_window_{method}"]
        ms = result[f"window_ms_{method}"]
        print(f"{method:12} {calls:>24.1f} {gathers:>19.1f} {ms:>10.1f}")
    print(f"naive / accumfn wall time per window: {result['ratio']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
