"""Peak extra memory of the fallback reduction on 2 DDP gloo ranks, against all gradients.

A window that closes after a forward that did not sync (a short final window, all forwards
before the backwards) is averaged by accumfn itself. It reduces bucket by bucket (25 MB,
as DDP), so its extra memory is about one bucket; a single flat copy of every gradient
(``torch.cat``, what accumfn 0.1 did) needs all of them again. Both run in the same
process, alternating; the extra memory is the rise of the process's peak resident set
(``VmHWM``, reset before each run through ``/proc/self/clear_refs``) over the resident set
before it. Linux only.

Run: python benchmarks/fallback_memory.py [--width 4096] [--layers 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from accumfn.parallel import _strategy as _distributed

__all__ = ["main"]

MB = 1024 * 1024


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _extra_peak(fn: Any) -> int:
    _reset_peak()
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def _flat_mean_allreduce(model: nn.Module) -> None:
    """The single flat copy: every gradient concatenated, all-reduced, copied back."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for grad, chunk in zip(grads, torch.split(flat, [g.numel() for g in grads]), strict=True):
        grad.copy_(chunk.view_as(grad))


def _worker(rank: int, port: int, width: int, layers: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=300),
    )
    model = DistributedDataParallel(
        nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    )
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    strategy = _distributed.strategy(model)
    runs: dict[str, list[int]] = {"bucketed": [], "flat": [], "nothing": []}
    for _ in range(repeats):
        runs["bucketed"].append(_extra_peak(strategy.mean_reduce_grads_))
        runs["flat"].append(_extra_peak(lambda: _flat_mean_allreduce(model)))
        runs["nothing"].append(_extra_peak(lambda: dist.barrier()))
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    result = {"rank": rank, "params": params, "grad_bytes": grad_bytes, "runs": runs}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096, help="width of each linear layer")
    parser.add_argument("--layers", type=int, default=3, help="number of linear layers")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats")
    args = parser.parse_args(argv)
    from tests._dist_utils import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _worker,
            args=(free_port(), args.width, args.layers, args.repeats, out),
            nprocs=2,
            start_method="spawn",
        )
        results = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    grad_mb = results[0]["grad_bytes"] / MB
    print(
        f"model: {results[0]['params'] / 1e6:.1f}M parameters, {grad_mb:.0f} MB of fp32 gradients"
    )
    print(f"bucket cap: {_distributed.BUCKET_BYTES / MB:.0f} MB")
    print(
        "| reduction | extra peak MB, median [min, max] over ranks x repeats | of all gradients |"
    )
    print("|---|---:|---:|")
    summary = {}
    for name in ("bucketed", "flat", "nothing"):
        values = [v / MB for r in results for v in r["runs"][name]]
        median = statistics.median(values)
        summary[name] = median
        print(
            f"| {name} | {median:.0f} [{min(values):.0f}, {max(values):.0f}] | "
            f"{median / grad_mb:.2f} |"
        )
    return summary


if __name__ == "__main__":
    main()
