"""``accumfn demo``: large-batch vs accumulated training on built-in data, side by side."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from ...errors import install_hint
from ...metrics import JsonlSink, MetricsTracker, Sink, WandbSink
from ._report import plot, verdict
from ._runs import DemoSettings, StepRecord, regression_steps, token_steps

__all__ = ["DemoResult", "DemoSettings", "StepRecord", "run_demo"]

TOLERANCE = 1e-5


@attrs.frozen
class DemoResult:
    passed: bool
    verdict: str
    records: tuple[StepRecord, ...]
    files: dict[str, str]


def _wandb_sink(out: Path, settings: DemoSettings) -> WandbSink | None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbSink(
        project="accumfn-demo",
        mode="offline",
        dir=str(out),
        config=attrs.asdict(settings),
    )


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="step", desc="effective steps", disable=not enabled)


def run_demo(
    settings: DemoSettings,
    out: Path,
    *,
    use_wandb: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Train both workloads three ways in lockstep, log every effective step, plot, judge.

    Every output numbers steps the same way: the effective step of a window, from 0, as
    ``MetricsTracker`` logs it (``_step`` in metrics.jsonl, ``step`` in summary.json, the
    plot's x axis). Each row of metrics.jsonl holds both workloads' values for that step.
    """
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": str(out / "metrics.jsonl")}
    sinks: list[Sink] = [JsonlSink(files["metrics"])]
    wandb_sink = _wandb_sink(out, settings) if use_wandb else None
    if wandb_sink is not None:
        sinks.append(wandb_sink)
        files["wandb"] = str(Path(wandb_sink.run.dir).parent)
    elif use_wandb:
        echo(install_hint("wandb", "wandb", "W&B logging") + "; logging to JSONL only.")
    records: list[StepRecord] = []
    bar = _progress(settings.steps * settings.epochs, progress)
    with MetricsTracker(
        gradient_accumulation_steps=settings.window, sinks=sinks, reduce="mean"
    ) as tracker:

        def on_micro(workload: str, step: int, loss: torch.Tensor) -> None:
            tracker.log_scalar(f"{workload}/micro_loss", loss, step=step)

        for pair in zip(
            regression_steps(settings, on_micro), token_steps(settings, on_micro), strict=True
        ):
            for record in pair:
                records.append(record)
                tracker.log(_row(record), step=record.step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(
                    " ".join(f"{r.workload} |dparam|={r.max_param_diff:.1e}" for r in pair)
                )
    if bar is not None:
        bar.close()
    png = out / "demo.png"
    if plot(records, TOLERANCE, png):
        files["plot"] = str(png)
    else:
        echo(install_hint("matplotlib", "demo", "The demo's plot") + "; no plot written.")
    passed, text = verdict(records, TOLERANCE)
    files["summary"] = str(out / "summary.json")
    summary = {
        "passed": passed,
        "tolerance": TOLERANCE,
        "settings": attrs.asdict(settings),
        "step": STEP_MEANING,
        "steps": [attrs.asdict(r) for r in records],
        "files": files,
    }
    Path(files["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
    return DemoResult(passed=passed, verdict=text, records=tuple(records), files=files)


STEP_MEANING = (
    "effective step of the window, from 0 (effective_step while it was open): _step in "
    "metrics.jsonl and the plot's x axis"
)


def _row(record: StepRecord) -> dict[str, float]:
    name = record.workload
    return {
        f"{name}/large_loss": record.large_loss,
        f"{name}/accumulated_loss": record.accumulated_loss,
        f"{name}/max_param_diff": record.max_param_diff,
        f"{name}/naive_max_param_diff": record.naive_max_param_diff,
        f"{name}/micro_batches": record.micro_batches,
        f"{name}/epoch": record.epoch,
    }
