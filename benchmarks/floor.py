"""``python -m benchmarks.floor``: what a window of one micro-batch costs at the least.

``GradientAccumulator(optimizer, 1, max_grad_norm=None)`` makes every micro-step a window.
Against the plain ``backward(); step(); zero_grad()`` loop, this times loops that do only
part of what any window of accumfn does, on one model and optimizer, in turns, as
``python -m benchmarks`` does (``timing.time_windows``), each clipping as the workload does
(``mlp_noclip``: none; the plain loop with ``clip_grad_norm_``, accumfn's own):

- ``transitions``: the plain loop plus the core's three transitions of a window
  (``micro_step``, ``close_window``, ``finish_step``: the state ``accumulate`` returns, the
  closed one and the next window's), and nothing else;
- ``one_transition``: the plain loop plus ``micro_step`` alone;
- ``loss_copy``: the plain loop plus the window's loss kept on the device (the loss
  detached and copied to float64: one op, as ``accumulate`` does on every micro-step);
- ``transitions_and_copy``: both, the least a window of accumfn does;
- ``window_of_one``: ``GradientAccumulator(optimizer, 1)`` itself.

with ``plain_control`` (the plain loop again) as the noise floor. It prints each loop's
ratio to the plain loop (median [min, max] over the repeats).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn
from torch.optim import Optimizer

from accumfn import core

from .loops import LOOPS, MicroStep, accumulator_loop
from .timing import compare, time_windows
from .workloads import Batch, Workload, workload

__all__ = ["main"]


def _lean(transitions: int, copy: bool) -> Callable[[Workload, nn.Module, Optimizer], MicroStep]:
    """The plain loop, with ``transitions`` of the core's three and the loss copy or not."""

    def make(work: Workload, model: nn.Module, optimizer: Optimizer) -> MicroStep:
        state = core.init(1, max_grad_norm=None)

        def step(index: int, batch: Batch, last: bool) -> None:
            nonlocal state
            loss = work.loss(model, batch)
            opened = core.micro_step(state, is_final_batch=last)[0] if transitions else state
            torch.autograd.backward(loss)
            if copy:
                loss.detach().to(torch.float64, copy=True)
            closed = core.close_window(opened) if transitions >= 2 else opened
            if work.max_grad_norm is not None:  # as the plain loop does
                torch.nn.utils.clip_grad_norm_(model.parameters(), work.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if transitions >= 3:
                state = core.finish_step(closed, applied=True, window=1)

        return step

    return make


ROWS = {
    "plain_control": "control: the plain loop again",
    "one_transition": "+ micro_step",
    "transitions": "+ the core's three transitions",
    "loss_copy": "+ the window's loss copy",
    "transitions_and_copy": "+ three transitions and the loss copy",
    "window_of_one": "GradientAccumulator(optimizer, 1)",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__)
    parser.add_argument("--only", nargs="+", default=["mlp_noclip"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--target", type=float, default=0.3, help="CPU seconds per repeat")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    LOOPS.update(
        plain_control=LOOPS["plain"],
        one_transition=_lean(1, False),
        transitions=_lean(3, False),
        loss_copy=_lean(0, True),
        transitions_and_copy=_lean(3, True),
        window_of_one=accumulator_loop(window=1),
    )
    names = ["plain", *ROWS]
    for name in args.only:
        timed = time_windows(workload(name), names, repeats=args.repeats, target_s=args.target)
        result = compare(timed, [(row, "plain") for row in ROWS])
        plain = result["loops"]["plain"]["micro_step"][0]
        print(f"{name}: plain loop {plain:.0f} us / step; ratio to it, median [min, max]")
        for row, label in ROWS.items():
            ratio = result["pairs"][f"{row}-plain"]["ratio"]
            print(f"  {label:56s} {ratio[0]:.4f} [{ratio[1]:.4f}, {ratio[2]:.4f}]")


if __name__ == "__main__":
    main()
