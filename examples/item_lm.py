"""Token-normalized accumulation for a tiny causal LM with ragged, masked sequences.

The loss of each micro-batch is a SUM over its tokens and ``num_items`` is its token
count; at the boundary accumfn divides by the window's total, so every update equals the
large-batch token-mean update, with no prefetch of the window. The script checks that
against a large-batch twin. Run: python examples/item_lm.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

import accumfn

VOCAB, WIDTH, LENGTH, IGNORE = 50, 32, 16, -100


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.GRU(WIDTH, WIDTH, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.mix(self.embed(tokens))
        return self.head(hidden)


def batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of random length padded to LENGTH; labels are the next token, pads masked."""
    tokens = torch.randint(0, VOCAB, (size, LENGTH + 1), generator=generator)
    lengths = torch.randint(2, LENGTH + 1, (size,), generator=generator)
    labels = tokens[:, 1:].masked_fill(torch.arange(LENGTH) >= lengths[:, None], IGNORE)
    return tokens[:, :-1], labels


def summed_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    return F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )


def main() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    twin = copy.deepcopy(model)  # trained on whole windows, for the check
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    micro_batches = [batch(generator, 4) for _ in range(22)]  # 5 windows of 4, then 2

    state = accumfn.init(steps=4, max_grad_norm=1.0, batch_size=4)
    for start in range(0, len(micro_batches), 4):
        window = micro_batches[start : start + 4]
        for i, (tokens, labels) in enumerate(window):
            loss = summed_loss(model, tokens, labels)
            tokens_here = int((labels != IGNORE).sum())
            state, stepped = accumfn.accumulate(
                state,
                loss,
                model,
                num_items=tokens_here,
                is_final_batch=start + i == len(micro_batches) - 1,
            )
            if stepped:
                state = accumfn.apply_step(state, optimizer, model)
        tokens, labels = (torch.cat(parts) for parts in zip(*window, strict=True))
        twin_optimizer.zero_grad()
        (summed_loss(twin, tokens, labels) / (labels != IGNORE).sum()).backward()
        nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        twin_optimizer.step()

    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(model.parameters(), twin.parameters(), strict=True)
    )
    assert diff < 1e-5, diff
    print(
        f"item-normalized LM: {state.optimizer_steps} steps, max |param - large batch| = {diff:.2e}"
    )


if __name__ == "__main__":
    main()
