"""The setups users run on 2 gloo ranks: exact against one large batch over both ranks'
data, or a clear error on every rank, and never a hang.

Each scenario trains the same data two ways: accumulated on 2 ranks (each rank its own
micro-batches) and as one large batch over all ranks' micro-batches of each window, on one
process. Scenarios that must fail record the error each rank raised.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import accumfn
from accumfn.parallel import _strategy as _distributed

from ._dist_utils import (
    CLASSES,
    FEATURES,
    SEQ,
    Batch,
    full_params,
    items,
    run_ranks,
    token_loss,
    token_model,
)

LR = 0.1
RankWindows = list[list[list[Batch]]]
"""``data[r][w]``: rank ``r``'s micro-batches of window ``w`` (ranks may differ in length)."""


def ranked_data(seed: int, lengths: list[list[int]], ragged: bool) -> RankWindows:
    """Random token batches; ``lengths[r][w]`` micro-batches for rank r in window w."""
    g = torch.Generator().manual_seed(seed)
    data: RankWindows = []
    for rank_lengths in lengths:
        windows = []
        for length in rank_lengths:
            window = []
            for _ in range(length):
                x = torch.randn(2, SEQ, FEATURES, generator=g)
                y = torch.randint(0, CLASSES, (2, SEQ), generator=g)
                if ragged:
                    keep = torch.randint(1, SEQ + 1, (2, 1), generator=g)
                    y = y.masked_fill(torch.arange(SEQ) >= keep, -100)
                window.append((x, y))
            windows.append(window)
        data.append(windows)
    return data


def large_batch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: RankWindows,
    loss_fn: Callable[[nn.Module, Batch, str], torch.Tensor] = token_loss,
) -> list[torch.Tensor]:
    """The reference: per window, one batch of every rank's micro-batches, token mean."""
    for w in range(len(data[0])):
        batches = [b for rank in data for b in rank[w]]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        loss_fn(model, (x, y), "mean").backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: list[list[Batch]],
    window: int,
    item_mode: bool,
    *,
    forwards_first: bool = False,
    loss_fn: Callable[[nn.Module, Batch, str], torch.Tensor] = token_loss,
    state: accumfn.AccumState | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> accumfn.AccumState:
    """The functional loop over this rank's windows; is_final_batch on the very last one."""
    state = accumfn.init(window, max_grad_norm=None) if state is None else state
    accumfn.prepare_forward(state, model)
    reduction = "sum" if item_mode else "mean"
    for w, micro in enumerate(windows):
        if forwards_first:  # every forward of the window first, then the backwards
            losses = [loss_fn(model, batch, reduction) for batch in micro]
        for m, batch in enumerate(micro):
            loss = losses[m] if forwards_first else loss_fn(model, batch, reduction)
            final = w == len(windows) - 1 and m == len(micro) - 1
            state, stepped = accumfn.accumulate(
                state,
                loss,
                model,
                is_final_batch=final,
                num_items=items(batch) if item_mode else None,
                scaler=scaler,
            )
            if stepped:
                state = accumfn.apply_step(state, optimizer, model, scaler=scaler)
    return state


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)


def _error(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


# -- exact scenarios ----------------------------------------------------------------------------


class TwoHeads(nn.Module):
    """A trunk and two heads; samples whose first feature is -100 do not use head b, and a
    batch of only such samples leaves head b out of the graph (no gradient at all)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(100)
        self.trunk = nn.Linear(FEATURES, 16)
        self.a = nn.Linear(16, CLASSES)
        self.b = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        out = self.a(h)
        use_b = x[:, 0, 0] > -10
        if bool(use_b.any()):
            out = out + use_b[:, None, None] * self.b(h)
        return out


def two_heads_loss(model: nn.Module, batch: Batch, reduction: str) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return nn.functional.cross_entropy(
        logits.reshape(-1, CLASSES), y.reshape(-1), ignore_index=-100, reduction=reduction
    )


def _without_head_b(data: RankWindows, ranks: tuple[int, ...]) -> RankWindows:
    """The last window of ``ranks`` does not use head b (marked in the input)."""
    for r in ranks:
        for x, _ in data[r][-1]:
            x[:, 0, 0] = -100.0
    return data


def _uneven(rank: int, item_mode: bool) -> dict[str, Any]:
    """Short final windows of 3 and 2 micro-batches (DDP only: FSDP2 gathers parameters in
    every forward, so its ranks must run the same number of forwards)."""
    data = ranked_data(11, [[4, 3], [4, 2]], ragged=item_mode)
    model = DistributedDataParallel(token_model(100))
    state = train(model, sgd(model), data[rank], 4, item_mode)
    reference = token_model(100)
    return {
        "params": full_params(model),
        "reference": large_batch(reference, sgd(reference), data),
        "steps": state.optimizer_steps,
    }


def _forwards_first(rank: int, item_mode: bool) -> dict[str, Any]:
    data = ranked_data(12, [[3, 3, 2], [3, 3, 2]], ragged=item_mode)
    model = DistributedDataParallel(token_model(100))
    train(model, sgd(model), data[rank], 3, item_mode, forwards_first=True)
    reference = token_model(100)
    return {"params": full_params(model), "reference": large_batch(reference, sgd(reference), data)}


def _unused(rank: int, unused_on: tuple[int, ...]) -> dict[str, Any]:
    data = _without_head_b(ranked_data(13, [[3, 2], [3, 2]], ragged=False), unused_on)
    model = DistributedDataParallel(TwoHeads(), find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    train(model, optimizer, data[rank], 3, False, loss_fn=two_heads_loss)
    reference = TwoHeads()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR)
    return {
        "params": full_params(model),
        "reference": large_batch(reference, ref_opt, data, loss_fn=two_heads_loss),
    }


def _counting_ddp(module: nn.Module, counts: list[int], **kwargs: Any) -> DistributedDataParallel:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    ddp = DistributedDataParallel(module, **kwargs)

    def hook(group: Any, bucket: Any) -> Any:
        counts.append(bucket.index())
        return default_hooks.allreduce_hook(group, bucket)

    # a lambda: DDP checks the annotations of a def, which are strings here
    ddp.register_comm_hook(None, lambda group, bucket: hook(group, bucket))
    return ddp


def _wrapped(rank: int, wrap: str, item_mode: bool) -> dict[str, Any]:
    data = ranked_data(14, [[3, 3, 2], [3, 3, 2]], ragged=item_mode)
    counts: list[int] = []
    model: nn.Module
    if wrap == "compile(ddp)":
        model = torch.compile(_counting_ddp(token_model(100), counts), backend="eager")
    elif wrap == "ddp(compile)":
        model = _counting_ddp(torch.compile(token_model(100), backend="eager"), counts)
    elif wrap == "compile(fsdp2)":
        from torch.distributed.fsdp import fully_shard

        model = token_model(100)
        fully_shard(model)
        model = torch.compile(model, backend="eager")
    elif wrap == "static_graph":
        model = _counting_ddp(token_model(100), counts, static_graph=True)
    else:
        raise AssertionError(wrap)
    train(model, sgd(model), data[rank], 3, item_mode)
    reference = token_model(100)
    return {
        "params": full_params(model),
        "reference": large_batch(reference, sgd(reference), data),
        "kind": _distributed.strategy(model).kind,
        "bucket_rounds": counts.count(0),
    }


def _hsdp(rank: int, world: int) -> dict[str, Any]:
    """HSDP over a (replicate=2, shard=1) mesh: the window spans both dims' ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
    data = ranked_data(15, [[3, 2], [3, 2]], ragged=True)
    model = token_model(100)
    fully_shard(model, mesh=mesh)
    train(model, sgd(model), data[rank], 3, True)
    reference = token_model(100)
    return {
        "params": full_params(model),
        "reference": large_batch(reference, sgd(reference), data),
        "world": _distributed.strategy(model).world,
    }


def _sub_mesh(rank: int, world: int) -> dict[str, Any]:
    """FSDP2 over the size-1 "dp" dim of a (dp=1, tp=2) mesh: each rank is its own group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    data = ranked_data(16 + rank, [[3, 2]], ragged=True)  # each rank its own data
    model = token_model(100)
    fully_shard(model, mesh=mesh["dp"])
    train(model, sgd(model), data[0], 3, True)
    reference = token_model(100)
    return {
        "params": full_params(model),
        "reference": large_batch(reference, sgd(reference), data),
        "world": _distributed.strategy(model).world,
    }


def _explicit_group(rank: int, world: int) -> dict[str, Any]:
    """A plain module with process_group=: accumfn averages the gradients itself."""
    data = ranked_data(17, [[3, 2], [3, 2]], ragged=True)
    model = token_model(100)
    state = accumfn.init(3, max_grad_norm=None)
    accumfn.prepare_forward(state, model, process_group=dist.new_group([0, 1]))
    train(model, sgd(model), data[rank], 3, True, state=state)
    reference = token_model(100)
    return {"params": full_params(model), "reference": large_batch(reference, sgd(reference), data)}


def _flush_zero_items(rank: int, world: int) -> dict[str, Any]:
    """A loader of unknown length closed by flush; rank 1 has micro-batches without items,
    and the second window has no item on either rank (skipped)."""
    data = ranked_data(21, [[3, 3, 3, 2], [3, 3, 3, 2]], ragged=True)
    for r, w, m in [(1, 0, 1), (1, 2, 0), (1, 3, 1), (0, 1, 0), (0, 1, 1), (0, 1, 2)]:
        data[r][w][m] = (data[r][w][m][0], torch.full_like(data[r][w][m][1], -100))
    for m in range(3):
        data[1][1][m] = (data[1][1][m][0], torch.full_like(data[1][1][m][1], -100))
    model = DistributedDataParallel(token_model(100))
    optimizer = sgd(model)
    state = accumfn.init(3, max_grad_norm=None)
    accumfn.prepare_forward(state, model)
    for batch in (b for window in data[rank] for b in window):  # no is_final_batch
        loss = token_loss(model, batch, "sum")
        state, stepped = accumfn.accumulate(state, loss, model, num_items=items(batch))
        if stepped:
            state = accumfn.apply_step(state, optimizer, model)
    state, stepped = accumfn.flush(state, model)
    if stepped:
        state = accumfn.apply_step(state, optimizer, model)
    reference = token_model(100)
    ref_opt = sgd(reference)
    for w in range(4):  # the large batch, skipping the window without items
        batches = [b for r in data for b in r[w]]
        y = torch.cat([b[1] for b in batches])
        if int((y != -100).sum()):
            token_loss(reference, (torch.cat([b[0] for b in batches]), y), "mean").backward()
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
    return {
        "params": full_params(model),
        "reference": [p.detach().clone() for p in reference.parameters()],
        "counts": (state.optimizer_steps, state.skipped_steps),
    }


def _wide_accumulation(rank: int, world: int) -> dict[str, Any]:
    """accum_dtype under DDP: the wide buffers are reduced once per window by accumfn."""
    data = ranked_data(23, [[3, 3, 2], [3, 3, 2]], ragged=True)
    model = DistributedDataParallel(token_model(100))
    state = accumfn.init(3, accum_dtype=torch.float64, max_grad_norm=None)
    train(model, sgd(model), data[rank], 3, True, state=state)
    reference = token_model(100)
    return {"params": full_params(model), "reference": large_batch(reference, sgd(reference), data)}


def _scaled(rank: int, wrap: str) -> dict[str, Any]:
    """A GradScaler on every rank (power-of-two scale: exact), short final windows."""
    lengths = [[4, 3], [4, 2]] if wrap == "ddp" else [[4, 2], [4, 2]]
    data = ranked_data(22, lengths, ragged=False)
    model = token_model(100)
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    else:
        model = DistributedDataParallel(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    state = train(model, sgd(model), data[rank], 4, False, scaler=scaler)
    reference = token_model(100)
    return {
        "params": full_params(model),
        "reference": large_batch(reference, sgd(reference), data),
        "steps": state.optimizer_steps,
    }


def _exact_worker(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)
    return {
        "uneven-ddp-mean": _uneven(rank, False),
        "uneven-ddp-items": _uneven(rank, True),
        "forwards-first-mean": _forwards_first(rank, False),
        "forwards-first-items": _forwards_first(rank, True),
        "unused-on-both": _unused(rank, (0, 1)),
        "unused-on-one": _unused(rank, (1,)),
        "explicit-group": _explicit_group(rank, world),
        "flush-zero-items": _flush_zero_items(rank, world),
        "accum-dtype": _wide_accumulation(rank, world),
        "grad-scaler-ddp": _scaled(rank, "ddp"),
        "grad-scaler-fsdp2": _scaled(rank, "fsdp2"),
    }


def _wrapper_worker(rank: int, world: int) -> dict[str, Any]:
    return {
        f"{wrap}-{'items' if item_mode else 'mean'}": _wrapped(rank, wrap, item_mode)
        for wrap in ("compile(ddp)", "ddp(compile)", "compile(fsdp2)", "static_graph")
        for item_mode in (False, True)
    }


def _fsdp_flush(rank: int, world: int, sync_every: bool) -> dict[str, Any]:
    """flush under FSDP2: exact with sync_every_micro_step, a clear error without it."""
    from torch.distributed.fsdp import fully_shard

    data = ranked_data(22, [[3, 2], [3, 2]], ragged=True)
    model = token_model(100)
    fully_shard(model)
    optimizer = sgd(model)
    state = accumfn.init(3, sync_every_micro_step=sync_every, max_grad_norm=None)
    try:
        for batch in (b for window in data[rank] for b in window):
            loss = token_loss(model, batch, "sum")
            state, stepped = accumfn.accumulate(state, loss, model, num_items=items(batch))
            if stepped:
                state = accumfn.apply_step(state, optimizer, model)
        state, stepped = accumfn.flush(state, model)
    except accumfn.AccumError as exc:
        return _error(exc)
    if stepped:
        state = accumfn.apply_step(state, optimizer, model)
    reference = token_model(100)
    return {"params": full_params(model), "reference": large_batch(reference, sgd(reference), data)}


def _fsdp_accum_dtype(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.fsdp import fully_shard

    model = token_model(100)
    fully_shard(model)
    state = accumfn.init(3, accum_dtype=torch.float32, max_grad_norm=None)
    batch = ranked_data(24, [[1], [1]], ragged=False)[rank][0][0]
    try:
        accumfn.accumulate(state, token_loss(model, batch, "mean"), model)
    except accumfn.AccumError as exc:
        return _error(exc)
    return {"type": None}


def _mesh_worker(rank: int, world: int) -> dict[str, Any]:
    return {
        "hsdp": _hsdp(rank, world),
        "sub-mesh": _sub_mesh(rank, world),
        "fsdp2-flush-sync-every": _fsdp_flush(rank, world, True),
        "fsdp2-flush-default": _fsdp_flush(rank, world, False),
        "fsdp2-accum-dtype": _fsdp_accum_dtype(rank, world),
    }


@pytest.fixture(scope="module")
def exact() -> list[dict[str, Any]]:
    return run_ranks(_exact_worker, timeout=240)


EXACT = [
    "uneven-ddp-mean",
    "uneven-ddp-items",
    "forwards-first-mean",
    "forwards-first-items",
    "unused-on-both",
    "unused-on-one",
    "explicit-group",
    "flush-zero-items",
    "accum-dtype",
    "grad-scaler-ddp",
    "grad-scaler-fsdp2",
]


@pytest.mark.parametrize("name", EXACT)
def test_equals_large_batch_over_both_ranks(exact: list[dict[str, Any]], name: str) -> None:
    for result in exact:
        torch.testing.assert_close(
            result[name]["params"], result[name]["reference"], rtol=1e-5, atol=1e-6
        )


def test_flush_and_windows_without_items_count_as_the_large_batch_does(
    exact: list[dict[str, Any]],
) -> None:
    for result in exact:
        assert result["flush-zero-items"]["counts"] == (3, 1)


def test_unused_parameter_keeps_no_gradient_so_adam_leaves_it(exact: list[dict[str, Any]]) -> None:
    """Head b has no gradient in the short final window: AdamW must not move it then."""
    for result in exact:
        head_b = [result["unused-on-both"]["params"][i] for i in (4, 5)]
        torch.testing.assert_close(
            head_b, [result["unused-on-both"]["reference"][i] for i in (4, 5)]
        )


@pytest.mark.parametrize(
    "name",
    [
        f"{wrap}-{mode}"
        for wrap in ("compile(ddp)", "ddp(compile)", "compile(fsdp2)", "static_graph")
        for mode in ("mean", "items")
    ],
)
def test_wrappers_are_recognised_and_exact(wrapped: list[dict[str, Any]], name: str) -> None:
    for result in wrapped:
        run = result[name]
        torch.testing.assert_close(run["params"], run["reference"], rtol=1e-5, atol=1e-6)
        assert run["kind"] == ("fsdp2" if "fsdp2" in name else "ddp")
        if "compile(ddp)" in name or "ddp(compile)" in name:
            # one DDP round in each of the two full windows; the short one falls back
            assert run["bucket_rounds"] == 2
        if "static_graph" in name:
            # the first iteration must sync (static_graph), then once per full window
            assert run["bucket_rounds"] == 3


@pytest.fixture(scope="module")
def wrapped() -> list[dict[str, Any]]:
    return run_ranks(_wrapper_worker, timeout=240)


@pytest.mark.parametrize("name", ["hsdp", "sub-mesh"])
def test_fsdp2_meshes_reduce_over_data_parallel_dims_only(name: str, meshes: Any) -> None:
    for result in meshes:
        run = result[name]
        torch.testing.assert_close(run["params"], run["reference"], rtol=1e-5, atol=1e-6)
        assert run["world"] == (2 if name == "hsdp" else 1)


def test_fsdp2_flush_is_exact_with_sync_every_micro_step_else_refused(meshes: Any) -> None:
    for result in meshes:
        run = result["fsdp2-flush-sync-every"]
        torch.testing.assert_close(run["params"], run["reference"], rtol=1e-5, atol=1e-6)
        assert result["fsdp2-flush-default"]["type"] == "ConfigError"
        assert "sync_every_micro_step=True" in result["fsdp2-flush-default"]["message"]
        assert result["fsdp2-accum-dtype"]["type"] == "ConfigError"
        assert "MixedPrecisionPolicy(reduce_dtype" in result["fsdp2-accum-dtype"]["message"]


@pytest.fixture(scope="module")
def meshes() -> list[dict[str, Any]]:
    return run_ranks(_mesh_worker, timeout=180)


# -- scenarios that must raise on every rank, never hang ----------------------------------------


def _extra_micro_batch(rank: int, world: int) -> dict[str, Any]:
    os.environ["ACCUMFN_SYNC_TIMEOUT"] = "20"
    data = ranked_data(18, [[3, 3, 1], [3, 3]], ragged=False)
    model = DistributedDataParallel(token_model(100))
    try:
        train(model, sgd(model), data[rank], 3, False)
    except accumfn.AccumError as exc:
        return _error(exc)
    return {"type": None}


def _full_vs_short_final(rank: int, world: int) -> dict[str, Any]:
    os.environ["ACCUMFN_SYNC_TIMEOUT"] = "20"
    data = ranked_data(19, [[3, 3], [3, 2]], ragged=False)
    model = DistributedDataParallel(token_model(100))
    try:
        train(model, sgd(model), data[rank], 3, False)
    except accumfn.AccumError as exc:
        return _error(exc)
    return {"type": None}


@pytest.mark.parametrize(
    ("worker", "says"),
    [
        (_extra_micro_batch, "ended their data (is_final_batch=True)"),
        (_full_vs_short_final, "closed this window with a backward that reduces"),
    ],
)
def test_ranks_of_different_lengths_raise_on_every_rank(
    worker: Callable[..., dict[str, Any]], says: str
) -> None:
    for result in run_ranks(worker, timeout=90):
        assert result["type"] == "RankMismatchError"
        assert says in result["message"]
        assert "DistributedSampler" in result["message"]


def _scaler_on_rank0_only(rank: int, world: int, wrap: str) -> dict[str, Any]:
    """Rank 0 scales its losses with a GradScaler, rank 1 does not."""
    os.environ["ACCUMFN_SYNC_TIMEOUT"] = "20"
    model = token_model(100)
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    else:
        model = DistributedDataParallel(model)
    before = full_params(model)
    optimizer = sgd(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if rank == 0 else None
    state = accumfn.init(2, max_grad_norm=None)
    accumfn.prepare_forward(state, model)
    try:
        for batch in ranked_data(21, [[2], [2]], ragged=False)[rank][0]:
            loss = token_loss(model, batch, "mean")
            state, stepped = accumfn.accumulate(state, loss, model, scaler=scaler)
            if stepped:
                state = accumfn.apply_step(state, optimizer, model, scaler=scaler)
        result = {"type": None}
    except accumfn.AccumError as exc:
        result = _error(exc)
    after = full_params(model)
    result["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    return result


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_a_grad_scaler_on_some_ranks_only_raises_on_every_rank(wrap: str) -> None:
    for result in run_ranks(_scaler_on_rank0_only, wrap, timeout=90):
        assert result["type"] == "RankMismatchError"
        assert "1 of 2 ranks scaled this window's losses with a GradScaler" in result["message"]
        assert "same scaler= to accumulate and the step on every rank" in result["message"]
        assert result["unchanged"]


def _lonely_boundary(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 never closes its window: rank 0's header waits, then says why."""
    os.environ["ACCUMFN_SYNC_TIMEOUT"] = "3"
    model = token_model(100)
    state = accumfn.init(1, max_grad_norm=None)
    accumfn.prepare_forward(state, model, process_group=dist.new_group([0, 1]))
    if rank == 1:
        time.sleep(8)  # busy elsewhere, longer than the timeout
        return {"type": None}
    batch = ranked_data(20, [[1]], ragged=False)[0][0][0]
    try:
        accumfn.accumulate(state, token_loss(model, batch, "mean"), model)
    except accumfn.AccumError as exc:
        return _error(exc)
    return {"type": None}


def test_a_rank_waiting_alone_gets_a_timeout_error_not_a_hang() -> None:
    results = run_ranks(_lonely_boundary, timeout=90)
    assert results[0]["type"] == "RankMismatchError"
    assert "did not come" in results[0]["message"]
    assert results[1] == {"type": None}
