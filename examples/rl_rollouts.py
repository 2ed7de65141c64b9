"""An RL loop whose windows are as long as each rollout: the caller closes them.

Each step samples a rollout batch of a random number of sequences from a tiny policy,
scores them, splits them into as many micro-batches of at most MICRO sequences as it
takes, runs backward on each and closes the window on the last one
(``is_final_batch=True``), which steps the optimizer. The loss is the token-mean policy
gradient over the whole rollout (a sum over tokens with ``num_items=`` their count), so
each update equals one step on the whole rollout at once: the script checks that against
a large-batch twin. Run: python examples/rl_rollouts.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

import accumfn

VOCAB, WIDTH, LENGTH, MICRO, EOS = 12, 32, 10, 4, 0


class Policy(nn.Module):
    """Next-token logits of a sequence (a GRU over token embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.GRU(WIDTH, WIDTH, batch_first=True)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.mix(self.embed(tokens))
        return self.head(hidden)


@torch.no_grad()
def rollout(
    policy: Policy, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``size`` sequences sampled from ``policy`` after a random prompt token: the tokens,
    the mask of generated tokens (up to and with the first EOS) and each one's advantage
    (its reward, the share of even tokens, normalized over the rollout as in GRPO)."""
    tokens = torch.randint(1, VOCAB, (size, 1), generator=generator)
    for _ in range(LENGTH):
        probs = F.softmax(policy(tokens)[:, -1], dim=-1)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=generator)], dim=1)
    generated = tokens[:, 1:]
    ended = (generated == EOS).long().cumsum(dim=1)
    mask = ((ended == 0) | ((ended == 1) & (generated == EOS))).float()
    reward = ((generated % 2 == 0).float() * mask).sum(1) / mask.sum(1)
    advantage = (reward - reward.mean()) / (reward.std() + 1e-4) if size > 1 else reward * 0
    return tokens, mask, advantage


def summed_loss(
    policy: Policy, tokens: torch.Tensor, mask: torch.Tensor, advantage: torch.Tensor
) -> torch.Tensor:
    """Policy-gradient loss summed over the generated tokens."""
    logp = F.log_softmax(policy(tokens[:, :-1]), dim=-1)
    taken = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return -(taken * advantage[:, None] * mask).sum()


def main() -> None:
    torch.manual_seed(0)
    policy = Policy()
    twin = copy.deepcopy(policy)  # trained on each whole rollout at once, for the check
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=3e-3)
    acc = accumfn.GradientAccumulator(optimizer, accumulation_steps=None, max_grad_norm=1.0)
    generator = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(8):
        size = int(torch.randint(1, 30, (), generator=generator))
        tokens, mask, advantage = rollout(policy, size, generator)
        chunks = list(
            zip(tokens.split(MICRO), mask.split(MICRO), advantage.split(MICRO), strict=True)
        )
        counts.append(len(chunks))
        for i, (tokens_i, mask_i, advantage_i) in enumerate(chunks):
            loss = summed_loss(policy, tokens_i, mask_i, advantage_i)
            stepped = acc.accumulate(
                loss,
                policy,
                is_final_batch=i == len(chunks) - 1,  # the rollout's last: close the window
                num_items=int(mask_i.sum()),  # its generated tokens
            )
            assert stepped == (i == len(chunks) - 1)

        twin_optimizer.zero_grad()
        (summed_loss(twin, tokens, mask, advantage) / mask.sum()).backward()
        nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        twin_optimizer.step()

    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(policy.parameters(), twin.parameters(), strict=True)
    )
    assert diff < 1e-5, diff
    print(
        f"RL rollouts: {acc.stats.optimizer_steps} steps of {counts} micro-batches, "
        f"max |param - large batch| = {diff:.2e}"
    )


if __name__ == "__main__":
    main()
