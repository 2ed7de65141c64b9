"""Property: item mode over ragged micro-batches equals the large-batch token-mean update.

A tiny causal language model (embedding + linear head) reads sequences whose labels are
partly masked with -100, so every micro-batch holds a different number of items. The
sequences are split into micro-batches of random sizes and grouped into windows, the last
one usually short. Each window's update must equal one step on the window's token-mean loss.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import accumfn

from .conftest import record

IGNORE = -100

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


class TinyLM(nn.Module):
    """Next-token logits from the current token alone: embedding, then a linear head."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def build(seed: int, vocab: int, dim: int) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(vocab, dim)


def token_loss(model: TinyLM, tokens: torch.Tensor, labels: torch.Tensor, reduction: str) -> Any:
    logits = model(tokens)
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction=reduction,
    )


@st.composite
def setups(draw: Any) -> dict[str, Any]:
    n_seqs = draw(st.integers(1, 16))
    # ragged micro-batches: random cut points over the sequences
    cuts = sorted(
        draw(st.sets(st.integers(1, n_seqs - 1), max_size=n_seqs - 1)) if n_seqs > 1 else []
    )
    return {
        "seed": draw(st.integers(0, 2**16)),
        "vocab": draw(st.integers(2, 10)),
        "dim": draw(st.integers(1, 6)),
        "seq_len": draw(st.integers(2, 7)),
        "n_seqs": n_seqs,
        "sizes": [b - a for a, b in zip([0, *cuts], [*cuts, n_seqs], strict=True)],
        "mask_rate": draw(st.sampled_from([0.0, 0.3, 0.7, 0.95])),
        "steps": draw(st.integers(1, 5)),
        "optimizer": draw(st.sampled_from(sorted(OPTIMIZERS))),
        "max_grad_norm": draw(st.sampled_from([None, 0.05, 1.0])),
        "api": draw(st.sampled_from(["functional", "object"])),
    }


def make_data(setup: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of shape (n_seqs, seq_len - 1); at least one label per micro-batch."""
    g = torch.Generator().manual_seed(setup["seed"])
    seqs = torch.randint(0, setup["vocab"], (setup["n_seqs"], setup["seq_len"]), generator=g)
    inputs, labels = seqs[:, :-1], seqs[:, 1:].clone()
    masked = torch.rand(labels.shape, generator=g) < setup["mask_rate"]
    starts = torch.tensor([0, *setup["sizes"][:-1]]).cumsum(0)
    masked[starts, 0] = False  # item mode needs num_items >= 1 on every micro-batch
    return inputs, labels.masked_fill(masked, IGNORE)


@settings(max_examples=200, deadline=None)
@given(setups())
def test_item_mode_equals_large_batch_token_mean(setup: dict[str, Any]) -> None:
    vocab, dim, steps = setup["vocab"], setup["dim"], setup["steps"]
    model, ref = build(setup["seed"], vocab, dim), build(setup["seed"], vocab, dim)
    make_opt, clip = OPTIMIZERS[setup["optimizer"]], setup["max_grad_norm"]
    inputs, labels = make_data(setup)
    micro_batches = list(
        zip(inputs.split(setup["sizes"]), labels.split(setup["sizes"]), strict=True)
    )
    counts = [int((y != IGNORE).sum()) for _, y in micro_batches]

    opt = make_opt(model.parameters())
    state = accumfn.init(steps=steps, max_grad_norm=clip)
    acc = accumfn.GradientAccumulator(opt, steps, max_grad_norm=clip)
    for i, ((x, y), n) in enumerate(zip(micro_batches, counts, strict=True)):
        loss, final = token_loss(model, x, y, "sum"), i == len(micro_batches) - 1
        if setup["api"] == "object":
            acc.accumulate(loss, model, is_final_batch=final, num_items=n)
            continue
        state, stepped = accumfn.accumulate(state, loss, model, is_final_batch=final, num_items=n)
        if stepped:
            state = accumfn.apply_step(state, opt, model)
    closed = acc.effective_step if setup["api"] == "object" else state.effective_step

    ref_opt = make_opt(ref.parameters())
    windows = [micro_batches[s : s + steps] for s in range(0, len(micro_batches), steps)]
    assert closed == len(windows)
    for window in windows:
        x = torch.cat([b[0] for b in window])
        y = torch.cat([b[1] for b in window])
        token_loss(ref, x, y, "mean").backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    diff = 0.0
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        diff = max(diff, float((p.detach() - q.detach()).abs().max()))
    record("item-mode equivalence (ragged tokens)", diff)
