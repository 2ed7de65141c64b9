"""accumfn.testing.assert_equivalent on gloo ranks: DDP, FSDP2, a user wrapper, and failures.

Everything the ranks run is defined at module level: the ranks are spawned processes that
import this module to find it.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from accumfn.errors import ConfigError
from accumfn.testing import RankFailedError, assert_equivalent
from accumfn.testing._spawn import FINISHED, every_rank_finished, report_progress, run_ranks

Batch = tuple[torch.Tensor, torch.Tensor]
CLASSES = 4


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, CLASSES))


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def step_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def regression(count: int, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(4, 6, generator=g), torch.randn(4, CLASSES, generator=g)) for _ in range(count)
    ]


def tokens(count: int, seed: int = 0) -> list[Batch]:
    """(inputs (2, 5, 6), labels (2, 5)); a random tail of each sequence is masked (-100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(2, 5, 6, generator=g)
        y = torch.randint(0, CLASSES, (2, 5), generator=g)
        keep = torch.randint(1, 6, (2, 1), generator=g)
        out.append((x, y.masked_fill(torch.arange(5) >= keep, -100)))
    return out


def token_sum_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(
        logits.reshape(-1, CLASSES), y.reshape(-1), ignore_index=-100, reduction="sum"
    )


def token_count(batch: Batch) -> int:
    return int((batch[1] != -100).sum())


# -- wrappers ---------------------------------------------------------------------------------
def leave_unwrapped(model: nn.Module) -> nn.Module:
    """Forgets data parallelism: each rank keeps its own gradients."""
    return model


def _all_reduce_then(bucket: dist.GradBucket, factor: float) -> torch.futures.Future[torch.Tensor]:
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0].mul_(factor))


# DDP checks a comm hook's annotations against the real classes, which string annotations
# (from __future__ import annotations) are not: the hooks are left unannotated.
def summing_hook(state, bucket):  # type: ignore[no-untyped-def]
    """All-reduces but does not divide by the world size."""
    return _all_reduce_then(bucket, 1.0)


def rank1_doubling_hook(state, bucket):  # type: ignore[no-untyped-def]
    """Averages on rank 0; on rank 1 sums (twice the mean)."""
    return _all_reduce_then(bucket, 0.5 if dist.get_rank() == 0 else 1.0)


def ddp_with_hook(model: nn.Module, hook: Any) -> nn.Module:
    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(None, hook)
    return ddp


def fail_on_rank1(model: nn.Module) -> nn.Module:
    if dist.get_rank() == 1:
        raise ValueError("the wrapper broke on rank 1")
    return DistributedDataParallel(model)


def exit_on_rank1(model: nn.Module) -> nn.Module:
    if dist.get_rank() == 1:
        os._exit(3)
    return DistributedDataParallel(model)


def hang_on_rank1(model: nn.Module) -> nn.Module:
    if dist.get_rank() == 1:
        time.sleep(600)
    return DistributedDataParallel(model)


def assert_passed(report: Any, windows: tuple[int, ...]) -> None:
    assert report.world_size == 2
    assert report.windows == windows
    assert {t.rank for t in report.tensors} == {0, 1}
    assert {t.name for t in report.tensors if t.kind == "gradient"} == {
        f"{p}.grad" for p in ("0.weight", "0.bias", "2.weight", "2.bias")
    }
    assert not report.diverged
    assert report.max_abs < 1e-5
    assert "rank 1 2.bias.grad" in str(report)


# -- the checks pass on correct setups ---------------------------------------------------------
def test_callable_wrapper_mean_mode_with_clip_scheduler_and_short_final_window() -> None:
    # 10 micro-batches: 5 per rank, windows of 3 and then a short one of 2 per rank; DDP with
    # tiny buckets, so a window's all-reduce round is several calls
    report = assert_equivalent(
        make_model,
        sgd,
        regression(10),
        steps=3,
        world_size=2,
        wrap=functools.partial(DistributedDataParallel, bucket_cap_mb=0.0001),
        max_grad_norm=0.5,
        make_scheduler=step_lr,
    )
    assert_passed(report, (3, 2))


def test_ddp_item_mode_ragged_tokens() -> None:
    report = assert_equivalent(
        make_model,
        adamw,
        tokens(10),
        steps=2,
        world_size=2,
        wrap="ddp",
        loss_fn=token_sum_loss,
        num_items=token_count,
    )
    assert_passed(report, (2, 2, 1))


def test_fsdp2_item_mode_clipped_with_short_final_window() -> None:
    report = assert_equivalent(
        make_model,
        adamw,
        tokens(6),
        steps=2,
        world_size=2,
        wrap="fsdp2",
        loss_fn=token_sum_loss,
        num_items=token_count,
        max_grad_norm=1.0,
    )
    assert_passed(report, (2, 1))


# -- wrong setups fail, naming rank, window and parameter --------------------------------------
def test_wrapper_that_does_not_average_fails_naming_ranks() -> None:
    with pytest.raises(AssertionError) as error:
        assert_equivalent(
            make_model, sgd, regression(8), steps=2, world_size=2, wrap=leave_unwrapped
        )
    message = str(error.value)
    assert "2 ranks, wrap=leave_unwrapped" in message
    assert "per window: rank 0 after window 0, rank 1 after window 0, of 2 windows" in message
    assert "rank 0 gradient 0.weight.grad" in message and "rank 1 gradient 2.bias.grad" in message
    assert "different gradients (window 0: rank 0 and rank 1" in message


def test_wrapper_that_sums_fails_naming_the_factor() -> None:
    wrap = functools.partial(ddp_with_hook, hook=summing_hook)
    with pytest.raises(AssertionError) as error:
        assert_equivalent(
            make_model, sgd, tokens(8), steps=2, world_size=2, wrap=wrap,
            loss_fn=token_sum_loss, num_items=token_count,
        )  # fmt: skip
    message = str(error.value)
    assert "rank 0 gradient 0.weight.grad" in message
    assert "rank 0's gradients in window 0 are 2 times the large batch's" in message
    assert "summed over the 2 ranks and not divided by the world size" in message


def test_one_wrong_rank_is_named_alone() -> None:
    wrap = functools.partial(ddp_with_hook, hook=rank1_doubling_hook)
    with pytest.raises(AssertionError) as error:
        assert_equivalent(make_model, sgd, regression(8), steps=2, world_size=2, wrap=wrap)
    message = str(error.value)
    # rank 1 goes wrong first; DDP then averages rank 0's gradients with those of rank 1's
    # wrong weights, so rank 0 follows one window later
    assert "wrap=partial(ddp_with_hook, hook=rank1_doubling_hook)" in message
    assert (
        "per window: rank 1 after window 0, rank 0 after window 1, of 2 windows "
        "(micro-batches per rank: [2, 2]). A rank that goes wrong first" in message
    )
    assert "rank 1 gradient 0.weight.grad: max abs" in message
    assert "rank 0 gradient 0.weight.grad: max abs" in message and "(from window 1)" in message
    assert "rank 1's gradients in window 0 are 2 times" in message
    assert "different gradients (window 0: rank 0 and rank 1" in message


# -- a rank that raises, exits or hangs is an error, and no rank is left running ---------------
def test_rank_that_raises_is_named_with_its_error() -> None:
    with pytest.raises(RankFailedError) as error:
        assert_equivalent(make_model, sgd, regression(4), world_size=2, wrap=fail_on_rank1)
    assert error.value.ranks == (1,)
    assert "rank 1 of 2 raised ValueError: the wrapper broke on rank 1" in str(error.value)
    assert "fail_on_rank1" in str(error.value)  # the rank's traceback
    assert multiprocessing.active_children() == []


def test_rank_that_exits_is_named_with_where_it_was() -> None:
    with pytest.raises(RankFailedError) as error:
        assert_equivalent(make_model, sgd, regression(4), world_size=2, wrap=exit_on_rank1)
    assert error.value.ranks == (1,)
    assert "rank 1 of 2 ended with exit code 3 while at 'wrapping the model" in str(error.value)
    assert multiprocessing.active_children() == []


def test_hanging_rank_becomes_an_error_at_the_timeout() -> None:
    with pytest.raises(RankFailedError) as error:
        assert_equivalent(
            make_model, sgd, regression(4), world_size=2, wrap=hang_on_rank1, timeout=30
        )
    message = str(error.value)
    assert error.value.ranks == (0, 1)
    assert "did not finish within 30 s, so its 2 ranks were killed" in message
    assert "rank 1 at 'wrapping the model (wrap=hang_on_rank1)'" in message
    assert multiprocessing.active_children() == []


def _abort_on_rank0(rank: int, world: int, port: int, workdir: str, timeout: float) -> None:
    """Rank 0 aborts as gloo's teardown sometimes does; ``finished``: after reporting so."""
    if Path(workdir).name.endswith("finished"):
        report_progress(workdir, rank, FINISHED)
        deadline = time.monotonic() + 20
        while not every_rank_finished(workdir, world) and time.monotonic() < deadline:
            time.sleep(0.05)
    if rank == 0:
        os.abort()


@pytest.mark.parametrize("when", ["finished", "working"])
def test_rank_aborting_counts_only_before_every_rank_finished(when: str) -> None:
    with tempfile.TemporaryDirectory(suffix=when) as workdir:
        if when == "finished":  # the results are written: gloo's teardown abort is no failure
            run_ranks(_abort_on_rank0, 2, workdir, 30.0, ())
        else:
            with pytest.raises(RankFailedError, match="rank 0 of 2 ended with signal SIGABRT"):
                run_ranks(_abort_on_rank0, 2, workdir, 30.0, ())
    assert multiprocessing.active_children() == []


# -- bad input: refused before any rank starts -------------------------------------------------
def test_unpicklable_functions_are_refused_with_the_fix() -> None:
    def local_model() -> nn.Module:
        return make_model()

    with pytest.raises(
        ConfigError, match=r"make_model=.*cannot be sent to the ranks.*module level"
    ):
        assert_equivalent(local_model, sgd, regression(4), world_size=2, wrap="ddp")
    with pytest.raises(ConfigError, match=r"loss_fn=.*lambda.*module level"):
        assert_equivalent(
            make_model, sgd, regression(4), world_size=2, wrap="ddp",
            loss_fn=lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"wrap=.*cannot be sent"):
        assert_equivalent(
            make_model, sgd, regression(4), world_size=2, wrap=lambda m: DistributedDataParallel(m)
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"world_size": 2}, "world_size=2 needs wrap="),
        ({"world_size": 0, "wrap": "ddp"}, "world_size must be an int >= 1"),
        ({"world_size": True, "wrap": "ddp"}, "world_size must be an int >= 1"),
        ({"world_size": 2, "wrap": "dp"}, "wrap must be 'ddp', 'fsdp2' or a function"),
        (
            {"world_size": 3, "wrap": "ddp"},
            "4 micro-batches cannot be dealt evenly to world_size=3",
        ),
        ({"world_size": 2, "wrap": "ddp", "timeout": 0}, "timeout must be a finite number"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        assert_equivalent(make_model, sgd, regression(4), **kwargs)
