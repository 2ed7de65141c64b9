"""Built-in synthetic data and tiny models for the demo (no download, seeded)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["IGNORE", "mlp", "ragged_tokens", "regression", "token_model"]

IGNORE = -100
"""Label of a masked token, as in ``torch.nn.functional.cross_entropy``."""


def regression(seed: int, n: int, features: int = 16, outputs: int = 4) -> tuple[torch.Tensor, ...]:
    """``n`` samples of a noisy linear map with a tanh kink."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, outputs, generator=g) / features**0.5
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, outputs, generator=g)
    return x, y


def ragged_tokens(
    seed: int, n: int, length: int = 12, vocab: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` padded sequences of random length; padding and a tenth of the tokens are masked."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    labels = (tokens * 5 + 3) % vocab  # a learnable next-token rule
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    positions = torch.arange(length).expand(n, length)
    masked = (positions >= lengths[:, None]) | (torch.rand(n, length, generator=g) < 0.1)
    return tokens, labels.masked_fill(masked, IGNORE)


def mlp(seed: int, features: int = 16, hidden: int = 64, outputs: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, outputs))


def token_model(seed: int, vocab: int = 32, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(vocab, width), nn.Tanh(), nn.Linear(width, vocab))
