"""Check that gradient accumulation is right on your own model: copy this into your tests.

Run with pytest (``pytest examples/equivalence_test.py``) or as a script
(``python examples/equivalence_test.py``). Replace ``make_model``, ``make_optimizer`` and
the batches with yours; keep dropout at p=0 (or the model in eval mode) for the check,
and freeze or replace BatchNorm, or the check fails and says why. The distributed check
spawns its ranks, so what it runs is defined at module level.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import accumfn
from accumfn.testing import HostSyncCounter, assert_equivalent
from accumfn.testing import strategies as acc_st

VOCAB, DIM = 50, 16


class TinyTagger(nn.Module):
    """Stands for your model: token ids (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.norm = nn.LayerNorm(DIM)  # LayerNorm is per item: fine. BatchNorm is not.
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.norm(self.embed(tokens)))
        return out


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def sequences(count: int, length: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens, labels) micro-batches; label -100 marks padding, as in most LM code."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, VOCAB, (2, length), generator=generator)
        labels = torch.randint(0, VOCAB, (2, length), generator=generator)
        pad = torch.randint(1, length, (2,), generator=generator)
        labels[0, pad[0] :] = -100  # ragged: each micro-batch has its own token count
        batches.append((tokens, labels))
    return batches


def token_loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, labels = batch
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")


def token_count(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return int((batch[1] != -100).sum())


def test_mean_loss_matches_one_large_batch() -> None:
    # Same-size micro-batches, mean-reduced loss: 7 micro-batches in windows of 3, 3, 1.
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 8, generator=generator), torch.randn(4, 2, generator=generator))]
    batches *= 7
    report = assert_equivalent(
        lambda: nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 2)),
        make_optimizer,
        batches,
        steps=3,
        max_grad_norm=1.0,
    )
    assert report.windows == (3, 3, 1)


def test_ragged_tokens_match_one_large_batch() -> None:
    # Token counts differ per micro-batch: sum the loss and pass num_items, and the
    # update equals the large batch's mean over all tokens in the window.
    assert_equivalent(
        TinyTagger,
        make_optimizer,
        sequences(count=6, length=5),
        steps=4,
        loss_fn=token_loss_sum,
        num_items=token_count,
        max_grad_norm=1.0,
    )


@settings(max_examples=10, deadline=None)
@given(acc_st.accumulation_splits(max_items=12, max_window=4, max_micro_batch=4))
def test_any_window_and_split_matches(split: acc_st.AccumulationSplit) -> None:
    # Hypothesis picks the window size and how the data is cut into micro-batches.
    (tokens, labels), *_ = sequences(count=1, length=6, seed=split.total)
    rows = torch.arange(split.total) % 2
    batches = [(tokens[rows[s]], labels[rows[s]]) for s in split.slices()]
    assert_equivalent(
        TinyTagger,
        make_optimizer,
        batches,
        steps=split.window,
        loss_fn=token_loss_sum,
        num_items=token_count,
    )


def test_ddp_on_two_ranks_matches_one_large_batch() -> None:
    # Your distributed setup, on the CPU: 2 gloo ranks, each on every other micro-batch,
    # against one large batch of both ranks' micro-batches per window. What the ranks run
    # is pickled for them: model, optimizer, loss and num_items are defined at module level.
    report = assert_equivalent(
        TinyTagger,
        make_optimizer,
        sequences(count=10, length=5),  # 5 per rank: windows of 2, 2, 1
        steps=2,
        loss_fn=token_loss_sum,
        num_items=token_count,
        max_grad_norm=1.0,
        world_size=2,
        wrap="ddp",  # or "fsdp2", or your function that wraps the model
    )
    assert report.windows == (2, 2, 1)


def test_no_host_sync_between_boundaries() -> None:
    model = TinyTagger()
    optimizer = make_optimizer(model)
    state = accumfn.init(4, max_grad_norm=1.0)
    for index, batch in enumerate(sequences(count=8, length=5)):
        loss = token_loss_sum(model, batch)
        items = token_count(batch)  # counted before the step: labels live on the host here
        with HostSyncCounter() as counter:
            state, stepped = accumfn.accumulate(state, loss, model, num_items=items)
        assert stepped or not counter.calls, f"micro-batch {index} synced: {counter.calls}"
        if stepped:
            state = accumfn.step_window(state, optimizer, model).state


if __name__ == "__main__":
    checks = [value for name, value in sorted(globals().items()) if name.startswith("test_")]
    failed = 0
    for check in checks:
        try:
            check()
        except AssertionError as error:
            failed += 1
            print(f"FAIL {check.__name__}\n{error}\n")
        else:
            print(f"ok   {check.__name__}")
    if failed:
        print(f"equivalence_test: {failed} of {len(checks)} checks FAILED")
        sys.exit(1)
    print(f"equivalence_test: all {len(checks)} checks passed: accumulation equals large batch")
