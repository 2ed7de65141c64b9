"""The code examples of the original GradientAccumulator guide, verbatim but for the import.

``from utils.training.engine import ...`` and ``from utils.training.metrics_tracker import ...``
read ``from accumfn import ...``. The API-reference blocks (a signature and a dataclass
listing) are checked by ``test_guide_examples.py`` against the real signatures instead.
"""

GUIDE: dict[str, str] = {
    "00 Manual Gradient Accumulation": """\
from accumfn import GradientAccumulator

# Initialize accumulator
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,      # Accumulate over 4 batches
    max_grad_norm=1.0,         # Gradient clipping
    batch_size=8               # Physical batch size
)

# Training loop
for epoch in range(epochs):
    for batch_idx, batch in enumerate(dataloader):
        # Forward pass
        loss = model(batch)

        # Accumulate gradients and check if optimizer should step
        should_step = accumulator.accumulate(
            loss=loss,
            model=model,
            is_final_batch=(batch_idx == len(dataloader) - 1)
        )

        if should_step:
            # Optimizer stepped - log metrics
            print(f"Optimizer step at batch {batch_idx}")
            print(f"Gradient norm: {accumulator.stats.last_grad_norm:.2e}")

        # Log metrics at effective steps (for W&B)
        metrics_tracker.log_scalar(
            'train/loss',
            loss.item(),
            step=accumulator.effective_step
        )

    # Reset for next epoch
    accumulator.reset_epoch()
""",
    "01 With Automatic Mixed Precision (AMP)": """\
from torch.amp import GradScaler

# Initialize with scaler
scaler = GradScaler('cuda')
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,
    scaler=scaler,  # AMP support
    batch_size=8
)

# Training loop (accumulator handles scaler automatically)
for batch in dataloader:
    with torch.autocast(device_type='cuda', dtype=torch.float16):
        loss = model(batch)

    # GradientAccumulator handles:
    # - scaler.scale(loss).backward()
    # - scaler.unscale_(optimizer)
    # - scaler.step(optimizer)
    # - scaler.update()
    should_step = accumulator.accumulate(loss, model)
""",
    "02 PyTorch Lightning Integration": """\
import pytorch_lightning as pl

# Lightning trainer with accumulation
trainer = pl.Trainer(
    accumulate_grad_batches=4,  # Lightning manages accumulation
    max_epochs=10
)

# GradientAccumulator detects and delegates
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=1,       # Disabled (Lightning controls)
    trainer=trainer             # Automatic detection
)

# Check detection
assert accumulator.is_lightning_managed
print(f"Effective batch: {accumulator.effective_batch_size}")  # 32 (8 * 4)

# In training loop, always returns True (Lightning controls)
for batch in dataloader:
    loss = model(batch)
    should_step = accumulator.accumulate(loss, model)  # Always True

    # effective_step matches Lightning's global_step
    print(f"Effective step: {accumulator.effective_step}")
""",
    "03 PyTorch Lightning Integration": """\
# This will raise ValueError
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,  # Manual accumulation
    trainer=trainer        # Lightning has accumulate_grad_batches=4
)
# Error: Gradient accumulation conflict detected!
#   Manual accumulation_steps: 4
#   Lightning accumulate_grad_batches: 4
#
# Resolution options:
#   1. Set accumulation_steps=1 (let Lightning manage)
#   2. Set trainer.accumulate_grad_batches=1 (use manual)
#   3. Remove trainer parameter (disable Lightning)
""",
    "04 Integration with MetricsTracker": """\
from accumfn import MetricsTracker

# Initialize tracker with accumulation awareness
tracker = MetricsTracker(
    use_wandb=True,
    gradient_accumulation_steps=4  # For commit control
)

accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,
    batch_size=8
)

# Training loop
for batch_idx, batch in enumerate(dataloader):
    loss = model(batch)
    should_step = accumulator.accumulate(loss, model)

    # Log at effective steps (75% reduction with steps=4)
    tracker.log_scalar(
        'train/batch_loss',
        loss.item(),
        step=accumulator.effective_step
    )
    # W&B commits only when effective_step changes
""",
    "05 Effective Batch Size Calculation": """\
# Physical batch size: 8
# Accumulation steps: 4
# Effective batch size = 8 * 4 = 32

accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,
    batch_size=8
)

print(f"Effective batch: {accumulator.effective_batch_size}")  # 32

# With Lightning
trainer = pl.Trainer(accumulate_grad_batches=8)
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=1,
    batch_size=4,
    trainer=trainer
)

print(f"Effective batch: {accumulator.effective_batch_size}")  # 32 (4 * 8)
""",
    "06 Gradient Clipping": """\
# Enable gradient clipping
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,
    max_grad_norm=1.0  # Clip to max norm 1.0
)

# Disable gradient clipping
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,
    max_grad_norm=None  # No clipping
)

# Access gradient norm
for batch in dataloader:
    loss = model(batch)
    should_step = accumulator.accumulate(loss, model)

    if should_step:
        grad_norm = accumulator.stats.last_grad_norm
        print(f"Pre-clip norm: {grad_norm:.2e}")
""",
    "07 Checkpointing and State Persistence": """\
# Save accumulator state with checkpoint
checkpoint = {
    'model': model.state_dict(),
    'optimizer': optimizer.state_dict(),
    'accumulator': accumulator.state_dict(),
    'epoch': epoch
}
torch.save(checkpoint, 'checkpoint.pt')

# Load checkpoint and resume training
checkpoint = torch.load('checkpoint.pt')
model.load_state_dict(checkpoint['model'])
optimizer.load_state_dict(checkpoint['optimizer'])

accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,
    batch_size=8
)
accumulator.load_state_dict(checkpoint['accumulator'])

# Resume training with correct step counts
print(f"Resuming from step {accumulator.effective_step}")
""",
    "08 Accumulation Statistics": """\
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,
    batch_size=8
)

for batch_idx, batch in enumerate(dataloader):
    loss = model(batch)
    accumulator.accumulate(loss, model)

    stats = accumulator.stats

    print(f"Total steps: {stats.total_steps}")           # Micro-batch count
    print(f"Optimizer steps: {stats.optimizer_steps}")   # Effective updates
    print(f"Current accumulation: {stats.current_accumulation}")  # 0-3
    print(f"Effective batch: {stats.effective_batch_size}")  # 32
    print(f"Is accumulating: {stats.is_accumulating}")   # True between steps
    print(f"Last grad norm: {stats.last_grad_norm:.2e}") # Pre-clip norm
""",
    "09 Advanced: Mathematical Equivalence": """\
# Configuration 1: Small batch + accumulation
config1 = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=8,
    batch_size=4
)
# Effective batch: 32

# Configuration 2: Large batch + no accumulation
config2 = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=1,
    batch_size=32
)
# Effective batch: 32

# Both produce identical parameter updates (within FP32 tolerance)
# Config1 uses less GPU memory (4 vs 32 samples at a time)
""",
    "10 Zero Overhead Mode": """\
# When accumulation_steps=1, no overhead
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=1,  # Standard training
    batch_size=32
)
# Optimizer steps every batch, no extra logic
""",
    "11 Conflict Error": """\
# Option 1: Use Lightning accumulation (recommended)
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=1,  # Disable manual
    trainer=trainer        # Lightning handles it
)

# Option 2: Use manual accumulation
trainer = pl.Trainer(accumulate_grad_batches=1)  # Disable Lightning
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,  # Manual control
    trainer=None
)
""",
    "12 Step Count Mismatch": """\
# Bad: logs at micro-batch steps
for batch_idx in range(100):
    loss = model(batch)
    accumulator.accumulate(loss, model)
    wandb.log({'loss': loss.item()}, step=batch_idx)  # Wrong!

# Good: logs at effective steps
for batch_idx in range(100):
    loss = model(batch)
    accumulator.accumulate(loss, model)
    wandb.log({'loss': loss.item()}, step=accumulator.effective_step)  # Correct!
""",
    "13 Incomplete Final Batch": """\
for batch_idx, batch in enumerate(dataloader):
    loss = model(batch)
    accumulator.accumulate(
        loss=loss,
        model=model,
        is_final_batch=(batch_idx == len(dataloader) - 1)  # Force step
    )
""",
    "16 Example 1: Large Effective Batch on Limited GPU": """\
# Goal: Effective batch of 128 on GPU with 8GB memory
# Solution: Small physical batch + accumulation

accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=16,  # 16 accumulation steps
    batch_size=8,           # Physical batch: 8
    max_grad_norm=1.0
)
# Effective batch: 128 (8 * 16)

for batch in small_dataloader:  # batch_size=8
    loss = model(batch)
    should_step = accumulator.accumulate(loss, model, is_final_batch=...)
""",
    "17 Example 2: Distributed Training with Lightning": """\
# Goal: Effective batch of 256 across 4 GPUs
# Solution: Lightning DDP + accumulation

trainer = pl.Trainer(
    accelerator='gpu',
    devices=4,                      # 4 GPUs
    strategy='ddp',
    accumulate_grad_batches=8       # Accumulate 8 batches
)

# Physical batch per GPU: 8
# Accumulation: 8
# GPUs: 4
# Effective batch: 8 * 8 * 4 = 256

accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=1,           # Lightning manages
    batch_size=8,
    trainer=trainer
)

assert accumulator.effective_batch_size == 64  # 8 * 8 (per GPU)
# Total across GPUs: 256
""",
    "18 Example 3: Metrics Logging with Accumulation": """\
# Goal: Log metrics at correct frequency with accumulation

tracker = MetricsTracker(
    use_wandb=True,
    gradient_accumulation_steps=4
)

accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=4,
    batch_size=8
)

for epoch in range(epochs):
    for batch_idx, batch in enumerate(dataloader):
        loss = model(batch)
        should_step = accumulator.accumulate(loss, model)

        # Log per-batch metrics (logged but not committed to W&B)
        tracker.log_scalar('train/batch_loss', loss.item(),
                          step=accumulator.effective_step)

        if should_step:
            # Log per-step metrics (committed to W&B)
            tracker.log_scalar('train/grad_norm',
                              accumulator.stats.last_grad_norm,
                              step=accumulator.effective_step)
""",
    "19 Before (Manual Implementation)": """\
optimizer.zero_grad()
accumulation_counter = 0

for batch_idx, batch in enumerate(dataloader):
    loss = model(batch)
    loss = loss / accumulation_steps  # Manual scaling
    loss.backward()

    accumulation_counter += 1

    if accumulation_counter == accumulation_steps:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        accumulation_counter = 0
""",
    "20 After (GradientAccumulator)": """\
accumulator = GradientAccumulator(
    optimizer=optimizer,
    accumulation_steps=accumulation_steps,
    max_grad_norm=1.0,
    batch_size=batch_size
)

for batch_idx, batch in enumerate(dataloader):
    loss = model(batch)
    accumulator.accumulate(loss, model, is_final_batch=...)
    # All logic handled internally!
""",
}
