"""The keywords added since 0.1, combined as users combine them: each case equals a
hand-written large-batch reference (or the run without the keyword), or raises a clear error
with nothing changed."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import accumfn
from accumfn.errors import CallOrderError, ConfigError, StepError

from .support import data


class EncoderHead(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.Tanh()).to(dtype)
        self.head = nn.Linear(8, 1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(x))
        return out


def _batches(n: int, seed: int = 0, size: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(seed, n * size, features=6, outputs=1)
    return list(zip(x.split(size), y.split(size), strict=True))


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone().double() for p in model.parameters()]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-6) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _large_batch(
    windows: list[list[tuple[torch.Tensor, torch.Tensor]]], item_mode: bool, dtype: torch.dtype
) -> list[torch.Tensor]:
    """One batch per window: mean over samples (item mode: over every sample of the window;
    mean mode: the mean of the micro-batch means)."""
    model = EncoderHead(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for window in windows:
        if item_mode:
            x = torch.cat([b[0] for b in window])
            y = torch.cat([b[1] for b in window])
            loss = (model(x.to(dtype)) - y.to(dtype)).pow(2).sum() / len(x)
        else:
            loss = sum((model(x.to(dtype)) - y.to(dtype)).pow(2).mean() for x, y in window) / len(
                window
            )
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _params(model)


@pytest.mark.parametrize("item_mode", [False, True], ids=["mean", "items"])
@pytest.mark.parametrize("api", ["functional", "object"])
def test_accum_dtype_covers_the_optimizer_parameters_outside_the_model_passed(
    item_mode: bool, api: str
) -> None:
    """One optimizer over an encoder and a head, ``accumulate(..., encoder)``, windows of 3,
    3 and a short final one of 2: the head's gradients get the window's rescale as the
    encoder's do (they accumulate in the wide buffer from the window after the first step)."""
    model = EncoderHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(8)
    windows = [batches[:3], batches[3:6], batches[6:]]
    state = accumfn.init(3, accum_dtype=torch.float64, max_grad_norm=None)
    acc = accumfn.GradientAccumulator(opt, 3, max_grad_norm=None, accum_dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        error = model(x) - y
        loss = error.pow(2).sum() if item_mode else error.pow(2).mean()
        final = i == len(batches) - 1
        items = len(x) if item_mode else None
        if api == "object":
            acc.accumulate(loss, model.encoder, is_final_batch=final, num_items=items)
            continue
        state, stepped = accumfn.accumulate(
            state, loss, model.encoder, is_final_batch=final, num_items=items
        )
        if stepped:
            state = accumfn.apply_step(state, opt, model.encoder)
    _close(_params(model), _large_batch(windows, item_mode, torch.float32))


def test_accum_dtype_covers_a_bf16_head_outside_the_model_passed() -> None:
    """bf16 parameters, accum_dtype fp32: within bf16 rounding of the large batch, and the
    head's later windows are summed in fp32 like the encoder's."""
    model = EncoderHead(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = _batches(12)
    acc = accumfn.GradientAccumulator(opt, 4, max_grad_norm=None, accum_dtype=torch.float32)
    for x, y in batches:
        loss = (model(x.bfloat16()) - y.bfloat16()).pow(2).sum()
        acc.accumulate(loss, model.encoder, num_items=len(x))
    windows = [batches[i : i + 4] for i in (0, 4, 8)]
    _close(_params(model), _large_batch(windows, True, torch.bfloat16), tol=2e-2)
    from accumfn.grads import buffers

    assert buffers.stash_params(model.encoder) is not None
    assert {id(p) for p in buffers._COVERED[model.encoder]} == {
        id(p) for p in model.head.parameters()
    }


def test_accum_dtype_leaves_gradients_of_parameters_no_optimizer_holds() -> None:
    """A head in no optimizer (requires_grad, but not trained) keeps the gradient the run
    without accum_dtype leaves it, not rescaled by the window (read after a step)."""
    results = []
    for accum_dtype in (None, torch.float64):
        model = EncoderHead()
        opt = torch.optim.SGD(model.encoder.parameters(), lr=0.1)
        state = accumfn.init(3, accum_dtype=accum_dtype, max_grad_norm=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untracked-parameter warning
            for x, y in _batches(6):
                loss = (model(x) - y).pow(2).sum()
                state, stepped = accumfn.accumulate(
                    state, loss, model, num_items=len(x), is_final_batch=False
                )
                if stepped:
                    state = accumfn.apply_step(state, opt, model)
        results.append([p.grad.clone() for p in model.head.parameters()])
    _close(results[0], results[1], tol=1e-6)  # float64 sums round differently


def test_flush_after_a_resume_steps_the_window_or_asks_for_the_model() -> None:
    """A checkpoint taken after a stream's last micro-batch; the restarted job calls
    ``flush()`` with no micro-step since: it asks for the model (never returns False with
    the window open), and with it steps the window exactly as the uninterrupted run."""
    batches = _batches(5)

    def build() -> tuple[EncoderHead, torch.optim.Optimizer, accumfn.GradientAccumulator]:
        model = EncoderHead()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, accumfn.GradientAccumulator(opt, 4, max_grad_norm=1.0)

    model, opt, acc = build()
    for x, y in batches:
        acc.accumulate((model(x) - y).pow(2).mean(), model)
    ckpt = copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "acc": acc.state_dict()}
    )
    assert acc.flush()
    uninterrupted = _params(model)

    model, opt, acc = build()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    acc.load_state_dict(ckpt["acc"])
    before = acc.state_dict()
    with pytest.raises(CallOrderError, match=r"call flush\(model\)"):
        acc.flush()
    assert acc.state_dict()["accumfn"] == before["accumfn"]
    assert acc.flush(model)
    assert acc.stats.optimizer_steps == 2
    _close(_params(model), uninterrupted, tol=0)


def _scaled_run(before_step: Any, windows: int = 4) -> tuple[list[Any], Any, list[Any]]:
    model = EncoderHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)
    acc = accumfn.GradientAccumulator(
        opt, 2, max_grad_norm=None, scaler=scaler, before_step=before_step
    )
    errors = []
    for x, y in _batches(2 * windows):
        try:
            acc.accumulate((model(x) - y).pow(2).mean(), model)
        except StepError as exc:
            errors.append(exc)
    return _params(model), acc, errors


def test_grad_scaler_survives_before_step_dropping_every_gradient() -> None:
    """Window 2's gradients are dropped in before_step (to skip a bad window): that window
    is skipped, the GradScaler's records are cleared, and every later window steps: the run
    equals the large batch over windows 1, 3 and 4."""
    calls = [0]

    def drop_second(optimizer: torch.optim.Optimizer) -> None:
        calls[0] += 1
        if calls[0] == 2:
            optimizer.zero_grad(set_to_none=True)

    params, acc, errors = _scaled_run(drop_second)
    assert errors == []
    assert (acc.stats.optimizer_steps, acc.stats.skipped_steps) == (3, 1)
    batches = _batches(8)
    windows = [batches[0:2], batches[4:6], batches[6:8]]
    model = EncoderHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for window in windows:
        (sum((model(x) - y).pow(2).mean() for x, y in window) / 2).backward()  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad(set_to_none=True)
    _close(params, _params(model), tol=1e-6)


def test_grad_scaler_skips_a_window_before_step_made_non_finite() -> None:
    calls = [0]

    def poison_second(optimizer: torch.optim.Optimizer) -> None:
        calls[0] += 1
        if calls[0] == 2:
            next(iter(optimizer.param_groups[0]["params"])).grad.fill_(math.inf)

    params, acc, errors = _scaled_run(poison_second)
    assert errors == []
    assert (acc.stats.optimizer_steps, acc.stats.skipped_steps) == (3, 1)
    assert all(torch.isfinite(p).all() for p in params)
    reference, _, _ = _scaled_run(lambda opt: None)
    # the skipped window aside, the same updates: not equal to the run that applied it
    assert any(not torch.equal(a, b) for a, b in zip(params, reference, strict=True))


@pytest.mark.parametrize("call", ["optimizer.step", "scaler.step", "scaler.update"])
def test_before_step_that_steps_the_optimizer_or_updates_the_scaler_is_refused(call: str) -> None:
    model = EncoderHead()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def before_step(optimizer: torch.optim.Optimizer) -> None:
        if call == "optimizer.step":
            optimizer.step()
        elif call == "scaler.step":
            scaler.step(optimizer)
        else:
            scaler.update()

    acc = accumfn.GradientAccumulator(
        opt, 2, max_grad_norm=None, scaler=scaler, before_step=before_step
    )
    before = _params(model)
    scaler_before = scaler.state_dict()
    batches = _batches(2)
    acc.accumulate((model(batches[0][0]) - batches[0][1]).pow(2).mean(), model)
    with pytest.raises(StepError, match="before_step") as info:
        acc.accumulate((model(batches[1][0]) - batches[1][1]).pow(2).mean(), model)
    assert isinstance(info.value.__cause__, ConfigError)
    _close(_params(model), before, tol=0)  # nothing stepped
    assert scaler.state_dict() == scaler_before  # scale and growth tracker as they were
    acc.before_step = None  # the next window works
    for x, y in _batches(2, seed=1):
        acc.accumulate((model(x) - y).pow(2).mean(), model)
    assert acc.stats.optimizer_steps == 1


@pytest.mark.parametrize("clip", [None, 0.5])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "grad-scaler"])
def test_an_optimizer_holding_only_sparse_gradients_steps(clip: float | None, amp: bool) -> None:
    """SparseAdam over an nn.Embedding(sparse=True), the rest frozen: equals the large batch
    (clipped as torch clips the coalesced gradient)."""
    torch.manual_seed(0)
    embedding = nn.Embedding(12, 4, sparse=True)
    head = nn.Linear(4, 1).requires_grad_(False)
    model = nn.Sequential(embedding, head)
    reference = copy.deepcopy(model)
    opt = torch.optim.SparseAdam(embedding.parameters(), lr=0.1)
    ref_opt = torch.optim.SparseAdam(reference[0].parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if amp else None
    acc = accumfn.GradientAccumulator(opt, 3, max_grad_norm=clip, scaler=scaler)
    g = torch.Generator().manual_seed(1)
    micro = [torch.randint(0, 12, (5,), generator=g) for _ in range(9)]
    for x in micro:
        acc.accumulate(model(x).pow(2).mean(), model)
    for w in range(3):
        for x in micro[3 * w : 3 * w + 3]:
            (reference(x).pow(2).mean() / 3).backward()
        grad = reference[0].weight.grad.coalesce()
        if clip is not None:
            norm = grad.values().norm()
            grad = grad * min(1.0, clip / (float(norm) + 1e-6))
        reference[0].weight.grad = grad
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    assert acc.stats.optimizer_steps == 3
    _close(_params(model), _params(reference), tol=1e-6)


@pytest.mark.parametrize("resume_at", [2, 6, 9])
def test_accum_dtype_resumes_a_window_of_a_head_outside_the_model(resume_at: int) -> None:
    """accum_dtype, accumulate(encoder), one optimizer over encoder and head; a checkpoint
    inside window 1, 2 or 3 loaded into fresh objects (no model given to restore): the head's
    wide buffer and the micro-steps after the resume are summed, as the large batch does."""
    from accumfn.checkpoint import capture, restore

    batches = _batches(12)

    def build() -> tuple[EncoderHead, torch.optim.Optimizer, accumfn.AccumState]:
        model = EncoderHead()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, accumfn.init(4, accum_dtype=torch.float64, max_grad_norm=None)

    model, opt, state = build()
    for i, (x, y) in enumerate(batches):
        if i == resume_at:
            saved = copy.deepcopy(
                {"m": model.state_dict(), "o": opt.state_dict(), "a": capture(state, opt)}
            )
            model, opt, state = build()
            model.load_state_dict(saved["m"])
            opt.load_state_dict(saved["o"])
            state = restore(saved["a"], state, opt)
        loss = (model(x) - y).pow(2).sum()
        state, stepped = accumfn.accumulate(state, loss, model.encoder, num_items=len(x))
        if stepped:
            state = accumfn.apply_step(state, opt, model.encoder)
    windows = [batches[i : i + 4] for i in (0, 4, 8)]
    _close(_params(model), _large_batch(windows, True, torch.float32))
