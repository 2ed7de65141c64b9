"""The functional API in a plain PyTorch loop: a window of 4 micro-batches of 8.

Run: python examples/manual_loop.py
"""

from __future__ import annotations

import json

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accumfn


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 10)  # 25 micro-batches: 6 full windows and a short one per epoch
    y = x @ torch.randn(10, 1) + 0.1 * torch.randn(200, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)

    state = accumfn.init(steps=4, max_grad_norm=1.0, batch_size=8)
    for _epoch in range(3):
        for i, (xb, yb) in enumerate(loader):
            loss = nn.functional.mse_loss(model(xb), yb)  # a mean over the micro-batch
            state, stepped = accumfn.accumulate(
                state, loss, model, is_final_batch=i == len(loader) - 1
            )
            if stepped:
                state = accumfn.apply_step(state, optimizer, model, scheduler=scheduler)
        # is_final_batch closed the short window, so the epoch ends on a boundary.
        assert not state.is_accumulating

    checkpoint = json.dumps(state.to_dict())  # plain, JSON-able
    restored = accumfn.AccumState.from_dict(json.loads(checkpoint))
    assert restored == state
    final = nn.functional.mse_loss(model(x), y).item()
    print(
        f"manual loop: {state.optimizer_steps} optimizer steps over {state.total_micro_steps} "
        f"micro-batches, effective batch {state.effective_batch_size}, "
        f"last lr {scheduler.get_last_lr()[0]:.2e}, final loss {final:.4f}"
    )


if __name__ == "__main__":
    main()
