"""``accum_dtype=torch.float32`` on a bf16 model: gradient error, memory and time.

A bf16 MLP accumulates a window of 16 micro-batches with and without ``accum_dtype``; the
gradient handed to the optimizer (read in ``before_step``) is compared with the fp32
large-batch gradient of the same weights. Time per micro-step: the two loops alternate
window by window in one process (thread CPU time, 1 thread), median of paired ratios with
[min, max]; a bf16-vs-bf16 control row shows the noise. Memory: the fp32 buffers held in
the middle of a window, against the bf16 gradients they replace.

Run: python -m benchmarks.accum_dtype [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

import accumfn
from accumfn.grads import buffers as _accum_buffer

__all__ = ["main"]

WINDOW, MICRO, WIDTH = 16, 8, 512


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH)).to(
        torch.bfloat16
    )


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(MICRO, WIDTH, generator=g), torch.randn(MICRO, WIDTH, generator=g))
        for _ in range(WINDOW)
    ]


def _window(model: nn.Module, accumulator: accumfn.GradientAccumulator, batches: list) -> float:
    start = time.thread_time()
    for x, y in batches:
        accumulator.accumulate(_loss(model, (x, y)), model)
    return (time.thread_time() - start) / len(batches)


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0].bfloat16()), batch[1].bfloat16())


def _run(
    dtype: torch.dtype | None,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    ref_grads: list[torch.Tensor],
) -> dict[str, Any]:
    """One window: the gradient error against the reference and the buffers it held."""
    model = _model()
    seen: list[torch.Tensor] = []

    def before_step(_: object) -> None:
        seen[:] = [p.grad.float() for p in model.parameters() if p.grad is not None]

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulator = accumfn.GradientAccumulator(
        optimizer, WINDOW, max_grad_norm=None, accum_dtype=dtype, before_step=before_step
    )
    for batch in batches[:-1]:
        accumulator.accumulate(_loss(model, batch), model)
    held = sum(
        b.numel() * b.element_size()
        for p in model.parameters()
        if (b := _accum_buffer.buffered(p)) is not None
    )
    accumulator.accumulate(_loss(model, batches[-1]), model)
    pairs = list(zip(seen, ref_grads, strict=True))
    return {
        "model": model,
        "acc": accumulator,
        "error": max(float((g - r).abs().max()) for g, r in pairs),
        "rel": max(float((g - r).norm() / r.norm()) for g, r in pairs),
        "buffers": held,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="paired windows timed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    batches = _data()

    reference = _model().float()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    nn.functional.mse_loss(reference(x), y).backward()
    ref_grads = [p.grad for p in reference.parameters()]

    runs = {}
    for name, dtype in (("bf16", None), ("fp32", torch.float32), ("bf16 again", None)):
        runs[name] = _run(dtype, batches, ref_grads)

    grad_bytes = sum(p.numel() * p.element_size() for p in runs["bf16"]["model"].parameters())
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for repeat in range(args.repeats):
        for name in order[repeat % 3 :] + order[: repeat % 3]:
            times[name].append(_window(runs[name]["model"], runs[name]["acc"], batches))

    def ratios(a: str, b: str) -> str:
        values = [x / y for x, y in zip(times[a], times[b], strict=True)]
        return f"{statistics.median(values):.3f} [{min(values):.3f}, {max(values):.3f}]"

    params = sum(p.numel() for p in runs["bf16"]["model"].parameters())
    print(
        f"bf16 MLP {WIDTH}-{4 * WIDTH}-{WIDTH} ({params / 1e6:.2f}M parameters), window "
        f"{WINDOW} x micro-batch {MICRO}, against the fp32 large-batch gradient"
    )
    print("| accumulation | max abs grad error | max relative error (norm) | buffers mid-window |")
    print("|---|---:|---:|---:|")
    for name in ("bf16", "fp32"):
        run = runs[name]
        print(
            f"| {name} | {run['error']:.2e} | {run['rel']:.2e} | {run['buffers'] / 2**20:.1f} MB |"
        )
    print(f"bf16 gradients: {grad_bytes / 2**20:.1f} MB")
    print(
        f"time per micro-step, fp32 / bf16: {ratios('fp32', 'bf16')}; control bf16 / bf16: "
        f"{ratios('bf16 again', 'bf16')} (median [min, max] of {args.repeats} paired windows)"
    )
    print(f"bf16 median: {statistics.median(times['bf16']) * 1e6:.0f} us per micro-step")


if __name__ == "__main__":
    main()
