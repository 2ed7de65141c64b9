"""DDP on 2 gloo ranks: accumulation equals one large batch, one all-reduce round per window.

All scenarios run in one spawned pair of processes (``_ddp_worker``); the tests assert on
what each rank recorded.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import accumfn
from accumfn import core

from ._dist_utils import (
    CollectiveCounter,
    items,
    make_windows,
    reference_run,
    run_ranks,
    token_loss,
    token_model,
)

WINDOW = 3
SHORT_END = (3, 3, 2)  # the last window is short: its boundary is unplanned (is_final_batch)
FULL_END = (3, 3)
LR = 0.2
BUCKET_CAP_MB = 0.001  # small buckets, so a round is several all-reduce calls

SCENARIOS: dict[str, dict[str, Any]] = {
    "functional-mean": {"api": "functional", "items": False},
    "functional-items": {"api": "functional", "items": True},
    "functional-mean-full-end": {"api": "functional", "items": False, "lengths": FULL_END},
    "object-mean": {"api": "object", "items": False, "clip": 1.0},
    "object-items": {"api": "object", "items": True, "clip": 1.0},
    "context-mean": {"api": "context", "items": False},
    "context-items": {"api": "context", "items": True},
    "functional-items-sync-every": {"api": "functional", "items": True, "sync_every": True},
}


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.5)


def _ddp(rank: int, counter: CollectiveCounter) -> DistributedDataParallel:
    ddp = DistributedDataParallel(token_model(rank + 100), bucket_cap_mb=BUCKET_CAP_MB)
    ddp.register_comm_hook(None, lambda group, bucket: counter.hook(group, bucket))
    return ddp


def _accumulated(rank: int, spec: dict[str, Any], data: Any) -> dict[str, Any]:
    counter = CollectiveCounter()
    model = _ddp(rank, counter)
    optimizer = _optimizer(model)
    api, item_mode, clip = spec["api"], spec["items"], spec.get("clip")
    sync_every = spec.get("sync_every", False)
    reduction = "sum" if item_mode else "mean"
    accumulator = None
    state = accumfn.init(WINDOW, max_grad_norm=clip, sync_every_micro_step=sync_every)
    if api == "object":
        accumulator = accumfn.GradientAccumulator(
            optimizer, WINDOW, max_grad_norm=clip, sync_every_micro_step=sync_every
        )
        accumulator.prepare(model)
    elif api == "functional":
        accumfn.prepare_forward(state, model)
    steps = []
    with counter.spy():
        for w, window in enumerate(data):
            counter.window = w
            for m, ranks in enumerate(window):
                batch = ranks[rank]
                final = w == len(data) - 1 and m == len(window) - 1
                num_items = items(batch) if item_mode else None
                if api == "context":
                    with accumfn.micro_step_context(state, model):
                        loss = token_loss(model, batch, reduction)
                else:
                    loss = token_loss(model, batch, reduction)
                if accumulator is not None:
                    stepped = accumulator.accumulate(
                        loss, model, is_final_batch=final, num_items=num_items
                    )
                else:
                    state, stepped = accumfn.accumulate(
                        state, loss, model, is_final_batch=final, num_items=num_items
                    )
                    if stepped:
                        state = accumfn.apply_step(state, optimizer, model)
                steps.append(stepped)
    final_state = accumulator.state if accumulator is not None else state
    return {
        "params": [p.detach().clone() for p in model.module.parameters()],
        "stepped": steps,
        "last_grad_norm": final_state.last_grad_norm,
        "optimizer_steps": final_state.optimizer_steps,
        **counter.summary(),
    }


def _naive(rank: int, data: Any) -> dict[str, Any]:
    """The loop people write first: backward on every micro-step, DDP syncs every time."""
    counter = CollectiveCounter()
    model = _ddp(rank, counter)
    optimizer = _optimizer(model)
    with counter.spy():
        for w, window in enumerate(data):
            counter.window = w
            for ranks in window:
                (token_loss(model, ranks[rank], "mean") / WINDOW).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return counter.summary()


def _ddp_worker(rank: int, world: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, spec in SCENARIOS.items():
        lengths = spec.get("lengths", SHORT_END)
        data = make_windows(len(name), lengths, micro_batch=2, ragged=spec["items"])
        reference = token_model(100)  # DDP broadcasts rank 0's initial parameters
        ref_norms = reference_run(reference, _optimizer(reference), data, spec.get("clip"))
        results[name] = _accumulated(rank, spec, data)
        results[name]["reference"] = [p.detach().clone() for p in reference.parameters()]
        results[name]["reference_norms"] = ref_norms
        results[name]["micro_steps"] = sum(lengths)
        results[name]["windows"] = len(lengths)
    data = make_windows(seed=7, window_lengths=SHORT_END, micro_batch=2, ragged=False)
    results["naive"] = _naive(rank, data)
    results["naive"]["micro_steps"] = sum(SHORT_END)
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(_ddp_worker, timeout=150)


def _rounds(result: dict[str, Any], window: int) -> list[list[int]]:
    """The all-reduce rounds DDP ran in ``window``: bucket indices, a round starting at 0.

    DDP launches a round's buckets in index order. Its first round is one bucket; after it DDP
    rebuilds the buckets in gradient-ready order (here into several buckets).
    """
    rounds: list[list[int]] = []
    for w, index in result["buckets"]:
        if w == window:
            if index == 0:
                rounds.append([])
            rounds[-1].append(index)
    for indices in rounds:
        assert indices == list(range(len(indices))), "a round must reduce each bucket once"
    return rounds


def _flat_all_reduces(result: dict[str, Any], window: int) -> int:
    """Explicit all-reduces of the whole flat gradient in ``window`` (the fallback)."""
    n_params = sum(p.numel() for p in token_model(0).parameters())
    return sum(1 for w, _, numel in result["all_reduces"] if w == window and numel == n_params)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_params_equal_large_batch(ranks: list[dict[str, Any]], name: str) -> None:
    for result in ranks:
        torch.testing.assert_close(
            result[name]["params"], result[name]["reference"], rtol=1e-5, atol=1e-6
        )
        assert result[name]["optimizer_steps"] == result[name]["windows"]
    torch.testing.assert_close(ranks[0][name]["params"], ranks[1][name]["params"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["object-mean", "object-items"])
def test_pre_clip_norm_matches_large_batch(ranks: list[dict[str, Any]], name: str) -> None:
    for result in ranks:
        expected = result[name]["reference_norms"][-1]
        assert result[name]["last_grad_norm"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", [n for n, s in SCENARIOS.items() if not s.get("sync_every")])
def test_one_all_reduce_round_per_window(ranks: list[dict[str, Any]], name: str) -> None:
    short_end = "lengths" not in SCENARIOS[name]
    for result in ranks:
        run = result[name]
        windows = run["windows"]
        for window in range(windows):
            rounds, flat = _rounds(run, window), _flat_all_reduces(run, window)
            if short_end and window == windows - 1:
                # unplanned boundary: its forward did not sync; one explicit flat all-reduce
                assert (rounds, flat) == ([], 1)
            else:
                # planned boundary: DDP reduced each bucket once, in the window's last backward
                assert (len(rounds), flat) == (1, 0)
        synced_windows = windows - short_end
        # buckets x windows, not buckets x micro-steps
        assert len(run["buckets"]) == sum(
            len(r) for w in range(synced_windows) for r in _rounds(run, w)
        )
        assert max(len(r) for w in range(1, synced_windows) for r in _rounds(run, w)) > 1


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_window_header_is_one_small_all_gather_per_window(
    ranks: list[dict[str, Any]], name: str
) -> None:
    """The closing window's identity, micro-steps, items, flags and summed loss: one int64
    all-gather of ``core.WIDTH`` values per rank per window, and no other int64 collective. With
    sync_every_micro_step the same row is also gathered at a window's first micro-step, and
    GradientAccumulator gathers it once more after the window that ends the data."""
    opens = SCENARIOS[name].get("sync_every", False)
    lengths = SCENARIOS[name].get("lengths", SHORT_END)
    for result in ranks:
        run = result[name]
        headers = [w for w, dtype, _ in run["all_gathers"] if dtype == "torch.int64"]
        per_window = [[w, w] if opens and lengths[w] > 1 else [w] for w in range(len(lengths))]
        if SCENARIOS[name]["api"] == "object":  # it compares once more after the data's end
            per_window[-1].append(len(lengths) - 1)
        assert run["windows"] == len(lengths)
        assert headers == [w for pair in per_window for w in pair]
        assert {numel for _, _, numel in run["all_gathers"]} == {core.WIDTH}
        assert not [w for w, dtype, _ in run["all_reduces"] if dtype == "torch.int64"]


def test_naive_loop_all_reduces_every_micro_step(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        naive = result["naive"]
        rounds = [len(_rounds(naive, w)) for w in range(len(SHORT_END))]
        assert rounds == list(SHORT_END)
        assert len(naive["buckets"]) > 2 * len(result["functional-mean"]["buckets"])


def test_sync_every_micro_step_reduces_every_micro_step(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        run = result["functional-items-sync-every"]
        rounds = [len(_rounds(run, w)) for w in range(len(SHORT_END))]
        assert rounds == list(SHORT_END)
        assert all(_flat_all_reduces(run, w) == 0 for w in range(len(SHORT_END)))
