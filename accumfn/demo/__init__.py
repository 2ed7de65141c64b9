"""``accumfn demo``: large-batch vs accumulated training on built-in data, side by side."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from ..metrics import JsonlSink, MetricsTracker, Sink, WandbSink
from ._report import plot, verdict
from ._runs import DemoSettings, StepRecord, regression_run, token_run

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
    """Train both ways, log every effective step, plot, and judge equivalence."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"metrics": str(out / "metrics.jsonl")}
    sinks: list[Sink] = [JsonlSink(files["metrics"])]
    wandb_sink = _wandb_sink(out, settings) if use_wandb else None
    if wandb_sink is not None:
        sinks.append(wandb_sink)
        files["wandb"] = str(Path(wandb_sink.run.dir).parent)
    elif use_wandb:
        echo("wandb is not installed: logging to JSONL only (pip install 'accumfn[wandb]').")
    records: list[StepRecord] = []
    total = 2 * settings.steps * settings.epochs
    bar = _progress(total, progress)
    offset = {"regression": 0, "tokens": settings.steps * settings.epochs}
    with MetricsTracker(
        gradient_accumulation_steps=settings.window, sinks=sinks, reduce="mean"
    ) as tracker:

        def on_micro(workload: str, step: int, loss: torch.Tensor) -> None:
            tracker.log_scalar(f"{workload}/micro_loss", loss, step=offset[workload] + step)

        def on_step(record: StepRecord) -> None:
            records.append(record)
            row = {
                f"{record.workload}/large_loss": record.large_loss,
                f"{record.workload}/accumulated_loss": record.accumulated_loss,
                f"{record.workload}/max_param_diff": record.max_param_diff,
            }
            if record.naive_max_param_diff is not None:
                row[f"{record.workload}/naive_max_param_diff"] = record.naive_max_param_diff
            tracker.log(row, step=offset[record.workload] + record.step - 1)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{record.workload} |dparam|={record.max_param_diff:.1e}")

        regression_run(settings, on_step, on_micro)
        token_run(settings, on_step, on_micro)
    if bar is not None:
        bar.close()
    png = out / "demo.png"
    if plot(records, TOLERANCE, png):
        files["plot"] = str(png)
    else:
        echo("matplotlib is not installed: no plot (pip install 'accumfn[demo]').")
    passed, text = verdict(records, TOLERANCE)
    files["summary"] = str(out / "summary.json")
    summary = {
        "passed": passed,
        "tolerance": TOLERANCE,
        "settings": attrs.asdict(settings),
        "steps": [attrs.asdict(r) for r in records],
        "files": files,
    }
    Path(files["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
    return DemoResult(passed=passed, verdict=text, records=tuple(records), files=files)
