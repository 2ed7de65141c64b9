"""Run a function on gloo ranks in spawned processes, with a deadline that kills them all.

The parent holds the rendezvous store (a ``TCPStore`` bound to 127.0.0.1 on a free port
the system picks), so no port is guessed. Each rank writes what it is doing to a progress
file; when the deadline passes, the message says where each rank was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.multiprocessing.spawn import (
    ProcessContext,
    ProcessExitedException,
    ProcessRaisedException,
    start_processes,
)

from ..errors import AccumError

__all__ = [
    "FINISHED",
    "RankFailedError",
    "connect",
    "every_rank_finished",
    "report_progress",
    "run_ranks",
]

_GRACE_S = 2.0
"""After one rank fails, how long the others get to stop before they are killed."""


class RankFailedError(AccumError, RuntimeError):
    """A rank of a distributed check raised, exited, or did not finish within the timeout."""

    def __init__(self, message: str, ranks: Sequence[int]) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)
        """The ranks that failed (for a timeout: those still running when it passed)."""


def _progress_file(workdir: str, rank: int) -> Path:
    return Path(workdir) / f"progress{rank}.txt"


def report_progress(workdir: str, rank: int, doing: str) -> None:
    """Record what this rank is doing, for the message if the check times out."""
    _progress_file(workdir, rank).write_text(doing)


FINISHED = "finished"
"""What a rank reports once its results are written, before it tears gloo down."""


def every_rank_finished(workdir: str, world: int) -> bool:
    """Whether every rank reported ``FINISHED``."""
    paths = [_progress_file(workdir, rank) for rank in range(world)]
    return all(path.exists() and path.read_text() == FINISHED for path in paths)


def _where(workdir: str, rank: int) -> str:
    path = _progress_file(workdir, rank)
    return repr(path.read_text()) if path.exists() else "'starting the process'"


def connect(rank: int, world: int, port: int, timeout: float) -> None:
    """Join the gloo process group whose store the parent holds on ``port``."""
    wait = timedelta(seconds=timeout)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=wait)  # type: ignore[attr-defined]
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=wait)


def run_ranks(
    entry: Callable[..., None], world: int, workdir: str, timeout: float, args: tuple[Any, ...]
) -> None:
    """Run ``entry(rank, world, port, workdir, timeout, *args)`` on ``world`` spawned ranks.

    Returns when every rank has finished. Raises ``RankFailedError`` naming the rank when one
    raises or exits, or naming where each rank was when ``timeout`` seconds pass; no rank
    is left running either way. A rank that ends abnormally after every rank reported
    ``FINISHED`` is not a failure: gloo sometimes aborts a process in its own teardown
    ("terminate called without an active exception"), after the results are written.
    """
    store = dist.TCPStore(  # type: ignore[attr-defined]
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=timeout), wait_for_workers=False
    )
    context: ProcessContext | None = start_processes(  # type: ignore[no-untyped-call]
        entry,
        args=(world, store.port, workdir, timeout, *args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    assert context is not None
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=0.5, grace_period=_GRACE_S):
            if time.monotonic() > deadline:
                running = [r for r, p in enumerate(context.processes) if p.is_alive()]
                raise RankFailedError(_timeout_message(workdir, world, timeout, running), running)
    except ProcessRaisedException as exc:
        rank = exc.error_index
        last = exc.msg.strip().splitlines()[-1]
        raise RankFailedError(
            f"rank {rank} of {world} raised {last}; the distributed check stopped and the "
            f"other ranks were stopped.{exc.msg}",
            [rank],
        ) from None
    except ProcessExitedException as exc:
        if every_rank_finished(workdir, world):
            return
        rank = exc.error_index
        how = f"signal {exc.signal_name}" if exc.signal_name else f"exit code {exc.exit_code}"
        raise RankFailedError(
            f"rank {rank} of {world} ended with {how} while at {_where(workdir, rank)}; the "
            f"distributed check stopped and the other ranks were stopped. Something in the "
            f"code it ran (make_model, wrap, loss_fn...) exited the process or was killed "
            f"(out of memory?).",
            [rank],
        ) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def _timeout_message(workdir: str, world: int, timeout: float, running: list[int]) -> str:
    where = "; ".join(
        f"rank {rank} at {_where(workdir, rank)}"
        if rank in running
        else f"rank {rank} had finished"
        for rank in range(world)
    )
    return (
        f"the distributed check did not finish within {timeout:g} s, so its {world} ranks "
        f"were killed ({where}). Ranks hang when one stops (a sleep, a deadlock, waiting "
        f"for input) or when they run different collectives (a wrapper, model or loss that "
        f"communicates on some ranks only, or a different number of forwards per rank). If "
        f"the check is only slow, pass a larger timeout=."
    )
