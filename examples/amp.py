"""Mixed precision with GradientAccumulator: GradScaler, autocast and skipped steps.

Uses CUDA with fp16 when a GPU is present, otherwise CPU with bfloat16 autocast and a CPU
GradScaler. Run: python examples/amp.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.amp import GradScaler

from accumfn import GradientAccumulator


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1)
    scaler = GradScaler(device)
    accumulator = GradientAccumulator(
        optimizer=optimizer,
        accumulation_steps=4,
        max_grad_norm=1.0,
        scaler=scaler,
        batch_size=16,
        scheduler=scheduler,
    )
    batches = 40
    x = torch.randn(batches * 16, 16, device=device)
    y = torch.randn(batches * 16, 4, device=device)
    for i in range(batches):
        xb, yb = x[i * 16 : (i + 1) * 16], y[i * 16 : (i + 1) * 16]
        with torch.autocast(device_type=device, dtype=dtype):
            loss = nn.functional.mse_loss(model(xb), yb)
        accumulator.accumulate(loss, model, is_final_batch=i == batches - 1)

    stats = accumulator.stats
    print(
        f"amp on {device} ({dtype}): {stats.optimizer_steps} optimizer steps, "
        f"{stats.skipped_steps} skipped by the scaler, scale {scaler.get_scale():.0f}, "
        f"last grad norm {stats.last_grad_norm:.3e}"
    )


if __name__ == "__main__":
    main()
