"""``accum_dtype``: a bf16 model's window summed in fp32, against hand-written loops."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import accumfn
from accumfn.checkpoint import capture, restore

from .support import data, mlp

WINDOW = 16


def _model(seed: int, dtype: torch.dtype) -> nn.Module:
    return mlp(seed, (16, 64, 64, 4)).to(dtype)


def _micro(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(seed, 4 * count, features=16, outputs=4)
    return list(zip(x.split(4), y.split(4), strict=True))


def _exact_sum(seed: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The window's micro-step gradients (each from a bf16 backward) summed exactly, in
    fp64: what accumulation would hand the optimizer without rounding between micro-steps."""
    model = _model(seed, torch.bfloat16)
    total = [torch.zeros_like(p, dtype=torch.float64) for p in model.parameters()]
    for x, y in batches:
        (nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()) / WINDOW).backward()
        for t, p in zip(total, model.parameters(), strict=True):
            t.add_(p.grad)
            p.grad = None
    return total


def _accumfn_grads(
    seed: int, batches: list[tuple[torch.Tensor, torch.Tensor]], accum_dtype: torch.dtype | None
) -> list[torch.Tensor]:
    model = _model(seed, torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    seen: list[torch.Tensor] = []
    accumulator = accumfn.GradientAccumulator(
        optimizer,
        WINDOW,
        max_grad_norm=None,
        accum_dtype=accum_dtype,
        before_step=lambda _: seen.extend(p.grad.clone() for p in model.parameters()),
    )
    for x, y in batches:
        accumulator.accumulate(nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()), model)
    return seen


def test_fp32_accumulation_rounds_once_where_bf16_rounds_every_micro_step() -> None:
    batches = _micro(0, WINDOW)
    exact = _exact_sum(0, batches)
    errors = {}
    for name, dtype in (("bf16", None), ("fp32", torch.float32)):
        grads = _accumfn_grads(0, batches, dtype)
        errors[name] = max(
            float(((g.double() - e) / e.abs().clamp_min(1e-3)).abs().max())
            for g, e in zip(grads, exact, strict=True)
        )
    assert errors["fp32"] <= 2.0**-8  # one bf16 rounding of the exact sum: half an ulp
    assert errors["bf16"] > 4 * errors["fp32"], errors


def test_accum_dtype_equals_a_hand_written_fp32_buffer_loop_bit_for_bit() -> None:
    batches = _micro(1, 2 * WINDOW + 3)  # two windows and a short third

    hand = _model(1, torch.bfloat16)
    hand_opt = torch.optim.AdamW(hand.parameters(), lr=1e-2)
    windows = [batches[i : i + WINDOW] for i in range(0, len(batches), WINDOW)]
    for window in windows:
        buffers = [torch.zeros_like(p, dtype=torch.float32) for p in hand.parameters()]
        for x, y in window:
            (nn.functional.mse_loss(hand(x.bfloat16()), y.bfloat16()) / WINDOW).backward()
            for b, p in zip(buffers, hand.parameters(), strict=True):
                b.add_(p.grad)
                p.grad = None
        for b, p in zip(buffers, hand.parameters(), strict=True):
            p.grad = b.mul(WINDOW / len(window)).to(torch.bfloat16)  # rescaled, rounded once
        hand_opt.step()
        hand_opt.zero_grad(set_to_none=True)

    model = _model(1, torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = accumfn.init(WINDOW, accum_dtype=torch.float32, max_grad_norm=None)
    for i, (x, y) in enumerate(batches):
        loss = nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16())
        final = i == len(batches) - 1
        state, stepped = accumfn.accumulate(state, loss, model, is_final_batch=final)
        if not stepped:  # held in fp32 buffers; the window's guard keeps one .grad, zeroed
            left = [p.grad for p in model.parameters() if p.grad is not None]
            assert len(left) == 1 and not left[0].any()
        else:
            state = accumfn.apply_step(state, optimizer, model)
    torch.testing.assert_close(list(model.parameters()), list(hand.parameters()), rtol=0, atol=0)


def test_mid_window_checkpoint_holds_the_fp32_buffers() -> None:
    batches = _micro(2, WINDOW + 4)

    def run(stop_at: int | None) -> list[torch.Tensor]:
        model = _model(2, torch.bfloat16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        state = accumfn.init(WINDOW, accum_dtype=torch.float32, max_grad_norm=None)
        for i, (x, y) in enumerate(batches):
            if i == stop_at:  # checkpoint, then resume into a fresh model and optimizer
                saved = capture(state, optimizer)
                assert {g.dtype for g in saved["partial_grads"]} == {torch.float32}
                fresh = _model(2, torch.bfloat16)
                fresh.load_state_dict(model.state_dict())
                fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
                fresh_opt.load_state_dict(optimizer.state_dict())
                model, optimizer = fresh, fresh_opt
                state = restore(
                    saved,
                    accumfn.init(WINDOW, accum_dtype=torch.float32, max_grad_norm=None),
                    optimizer,
                )
            loss = nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16())
            final = i == len(batches) - 1
            state, stepped = accumfn.accumulate(state, loss, model, is_final_batch=final)
            if stepped:
                state = accumfn.apply_step(state, optimizer, model)
        return [p.detach().clone() for p in model.parameters()]

    torch.testing.assert_close(run(WINDOW + 2), run(None), rtol=0, atol=0)
    torch.testing.assert_close(run(5), run(None), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"accum_dtype": torch.int8}, "accum_dtype must be torch.float32, torch.float64 or None"),
        ({"accum_dtype": "bf16"}, "accum_dtype must be"),
        ({"accum_dtype": torch.float32, "sync_every_micro_step": True}, "do not combine"),
    ],
)
def test_bad_accum_dtype_is_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(accumfn.ConfigError, match=message):
        accumfn.init(4, **kwargs)  # type: ignore[arg-type]


def test_fp16_item_mode_window_sum_beyond_fp16_is_divided_before_it_is_rounded() -> None:
    """A window's item sum an fp16 gradient cannot hold (> 65504) stays finite: the fp32
    buffer is divided by the window's item count before its one rounding."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1).half()
    reference = nn.Linear(4, 1)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(2048, 4, generator=g) * 3, torch.randn(2048, 1, generator=g)) for _ in range(8)
    ]
    state = accumfn.init(8, accum_dtype=torch.float32, max_grad_norm=None)
    seen: list[torch.Tensor] = []
    for x, y in batches:
        loss = ((model(x.half()).float() - y) ** 2).sum()
        state, stepped = accumfn.accumulate(state, loss, model, num_items=2048)
    assert stepped
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumfn.apply_step(
        state,
        optimizer,
        model,
        before_step=lambda _: seen.extend(p.grad.float() for p in model.parameters()),
    )
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    ((reference(x) - y) ** 2).mean().backward()
    for got, want in zip(seen, [p.grad for p in reference.parameters()], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
