"""Property: accumulated training equals large-batch training, window for window.

Each window is trained both ways in lockstep and the gradient the optimizer is handed is
compared (fp32). Parameters are compared end to end: with SGD in fp32, with Adam and
AdamW in fp64 or, in fp32, one step after identical weights. Adam's update
``m / (sqrt(v) + eps)`` is ill-conditioned for gradient entries near zero: an fp32
rounding difference there moves the weight by up to ``lr``, which says nothing about
accumulation, so in fp32 the large-batch twin restarts each window from the accumulated
run's weights and the check is on the applied gradient.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import accumfn
from tests.support import max_param_diff, mse

from .conftest import record

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


@st.composite
def setups(draw: Any) -> dict[str, Any]:
    steps = draw(st.integers(1, 8))
    n_micro = draw(st.integers(1, 20))  # multiples of the window and not: short final windows
    return {
        "seed": draw(st.integers(0, 2**16)),
        "widths": draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)),
        "optimizer": draw(st.sampled_from(sorted(OPTIMIZERS))),
        "max_grad_norm": draw(st.sampled_from([None, 0.05, 1.0])),
        "steps": steps,
        "n_micro": n_micro,
        "micro": draw(st.integers(1, 5)),
        "api": draw(st.sampled_from(["functional", "object"])),
        "fp64": draw(st.booleans()),
    }


def build(seed: int, widths: list[int], dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    sizes = [4, *widths, 2]
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


class Driver:
    """Feeds micro-batches through the functional API or GradientAccumulator."""

    def __init__(self, setup: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer):
        self.model, self.opt, self.api = model, opt, setup["api"]
        self.state = accumfn.init(steps=setup["steps"], max_grad_norm=setup["max_grad_norm"])
        self.acc = accumfn.GradientAccumulator(
            opt, setup["steps"], max_grad_norm=setup["max_grad_norm"]
        )

    def micro_step(self, x: torch.Tensor, y: torch.Tensor, final: bool) -> bool:
        loss = mse(self.model, x, y)
        if self.api == "object":
            return self.acc.accumulate(loss, self.model, is_final_batch=final)
        self.state, stepped = accumfn.accumulate(self.state, loss, self.model, is_final_batch=final)
        if stepped:
            self.state = accumfn.apply_step(self.state, self.opt, self.model)
        return stepped

    @property
    def effective_step(self) -> int:
        return self.acc.effective_step if self.api == "object" else self.state.effective_step


@settings(max_examples=300, deadline=None)
@given(setups())
def test_accumulated_equals_large_batch(setup: dict[str, Any]) -> None:
    adam = setup["optimizer"] != "sgd"
    dtype = torch.float64 if adam and setup["fp64"] else torch.float32
    model = build(setup["seed"], setup["widths"], dtype)
    ref = build(setup["seed"], setup["widths"], dtype)
    steps, micro, n_micro = setup["steps"], setup["micro"], setup["n_micro"]
    forced = adam and dtype == torch.float32
    g = torch.Generator().manual_seed(setup["seed"])
    x = torch.randn(micro * n_micro, 4, generator=g, dtype=dtype)
    y = torch.randn(micro * n_micro, 2, generator=g, dtype=dtype)
    opt = OPTIMIZERS[setup["optimizer"]](model.parameters())
    ref_opt = OPTIMIZERS[setup["optimizer"]](ref.parameters())
    applied: list[list[torch.Tensor]] = []
    opt.register_step_pre_hook(lambda *_: applied.append(grads(model)))
    driver = Driver(setup, model, opt)
    window = micro * steps
    worst = 0.0
    for w, start in enumerate(range(0, len(x), window)):
        if forced:
            ref.load_state_dict(model.state_dict())
        ref_opt.zero_grad(set_to_none=True)
        mse(ref, x[start : start + window], y[start : start + window]).backward()
        if setup["max_grad_norm"] is not None:
            nn.utils.clip_grad_norm_(ref.parameters(), setup["max_grad_norm"])
        expected = grads(ref)
        ref_opt.step()
        stepped = [
            driver.micro_step(xb, yb, final=s + micro >= len(x))
            for s, xb, yb in zip(
                range(start, min(start + window, len(x)), micro),
                x[start : start + window].split(micro),
                y[start : start + window].split(micro),
                strict=True,
            )
        ]
        assert stepped[-1] and not any(stepped[:-1])
        assert len(applied) == w + 1 == driver.effective_step
        for got, want in zip(applied[-1], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        worst = max(
            [
                worst,
                *(float((a - b).abs().max()) for a, b in zip(applied[-1], expected, strict=True)),
            ]
        )
    if dtype == torch.float32:
        record(
            "mean-mode applied gradient (fp32), every window",
            worst,
            quantity="|grad - large-batch grad|",
        )
    if not forced:
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        label = "Adam/AdamW fp64" if adam else "SGD fp32"
        record(f"mean-mode equivalence end to end, {label}", max_param_diff(model, ref))
