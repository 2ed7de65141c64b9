"""The results as Markdown tables, the form docs/benchmarks.md shows."""

from __future__ import annotations

from typing import Any

__all__ = ["table"]

LABELS = {
    "hand_control-hand": "control: hand loop again - hand loop",
    "accumfn-hand": "accumfn (`accumulate` + `step_window`) - hand",
    "accumulator-hand": "`GradientAccumulator` - hand",
    "accumfn_apply_step-hand": "accumfn with `apply_step` (reads the norm) - hand",
    "accumulator-accumfn": "`GradientAccumulator` - accumfn functional",
    "accumulator_steps1-plain": (
        "`GradientAccumulator(opt, 1, max_grad_norm=None)` - plain backward/step/zero_grad"
    ),
    "accumfn-accelerate": "accumfn - Accelerate `accumulate`",
    "accumfn-lightning": "accumfn - Lightning `accumulate_grad_batches`",
}


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _spread(values: list[float], digits: int = 1, sign: bool = True) -> str:
    median, low, high = values
    form = f"+.{digits}f" if sign else f".{digits}f"
    return f"{median:{form}} [{low:{form}}, {high:{form}}]"


def _timing_rows(results: dict[str, Any]) -> list[str]:
    rows = [
        "| workload | hand loop us / micro-step | comparison | difference us / micro-step "
        "| ratio | non-boundary us / micro-step | boundary us / window |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, timing in results["timing"].items():
        hand = timing["loops"]["hand"]["micro_step"][0]
        title = results["workloads"][name]
        for pair, label in LABELS.items():
            row = timing["pairs"].get(pair)
            if row is None:
                continue
            rows.append(
                f"| {title} | {hand:.0f} | {label} | {_spread(row['micro_step_diff_us'])} "
                f"| {_spread(row['ratio'], 3, sign=False)} "
                f"| {_spread(row['non_boundary_diff_us'])} "
                f"| {_spread(row['boundary_diff_us'])} |"
            )
        for loop, why in timing.get("missing", {}).items():
            rows.append(f"| {title} | {hand:.0f} | {loop}: not available ({why}) | | | | |")
    return rows


def _sweep_rows(results: dict[str, Any]) -> list[str]:
    sweep = [name for name in results["timing"] if name.startswith("tensors")]
    rows = [
        "| parameter tensors (SGD foreach, clip 1.0) | hand loop boundary us "
        "| accumfn extra us / window | `GradientAccumulator` extra us / window "
        "| control us / window |",
        "|---:|---:|---:|---:|---:|",
    ]
    for name in sweep:
        timing = results["timing"][name]
        pairs = timing["pairs"]
        cells = [
            _spread(pairs[p]["boundary_diff_us"]) if p in pairs else "n/a"
            for p in ("accumfn-hand", "accumulator-hand", "hand_control-hand")
        ]
        hand = timing["loops"]["hand"]["boundary"][0]
        rows.append(f"| {name.removeprefix('tensors')} | {hand:.0f} | " + " | ".join(cells) + " |")
    return rows


def _sync_rows(results: dict[str, Any]) -> list[str]:
    rows = [
        "| workload | loop | syncs, non-boundary step (max) | syncs per window boundary |",
        "|---|---|---:|---:|",
    ]
    for name, syncs in results["syncs"].items():
        for loop, row in syncs.items():
            if "not_available" in row:
                rows.append(f"| {name} | {loop} | not available | |")
            else:
                calls = ", ".join(f"{k}x{v}" for k, v in row["boundary_calls"].items())
                rows.append(
                    f"| {name} | {loop} | {row['non_boundary_max']} "
                    f"| {row['boundary_per_window']:g} ({calls or 'none'}) |"
                )
    return rows


def _memory_rows(results: dict[str, Any]) -> list[str]:
    rows = [
        "| workload | loop | peak RSS MiB | training MiB (peak - before model) |",
        "|---|---|---:|---:|",
    ]
    for name, mem in results["memory"].items():
        for loop, row in mem.items():
            digits = 1 if "/" not in loop else 3
            rows.append(
                f"| {name} | {loop} | {_num(row['peak_rss_mib'], digits)} "
                f"| {_num(row['training_mib'], digits)} |"
            )
    return rows


def _ddp_rows(results: dict[str, Any]) -> list[str]:
    ddp = results.get("ddp")
    if ddp is None:
        return []
    if "not_available" in ddp:
        return [f"DDP (2 gloo ranks): not available ({ddp['not_available']})"]
    rows = ["| DDP, 2 gloo ranks | value |", "|---|---:|"]
    rows += [f"| {key} | {_num(value)} |" for key, value in ddp.items()]
    return rows


def table(results: dict[str, Any]) -> str:
    """All sections, each a Markdown table, headed by the machine."""
    m, s = results["machine"], results["settings"]
    head = (
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads), Python {m['python']}, load {m['load_average_1m']}. "
        f"Window {s['window']}; {s['repeats']} repeats of about {s['target_s_per_repeat']} s "
        f"CPU per loop; the loops take turns a window at a time on one model and optimizer. "
        f"Thread CPU time; a difference is median [min, max] over the repeats."
    )
    sections = [
        [head],
        ["Time per micro-step", *_timing_rows(results)],
        ["Boundary cost against the number of parameter tensors", *_sweep_rows(results)],
    ]
    if results["syncs"]:
        sections.append(["Host-device syncs", *_sync_rows(results)])
    if results["memory"]:
        sections.append(
            ["Peak memory (fresh process per loop; ratios in the a/b rows)", *_memory_rows(results)]
        )
    ddp = _ddp_rows(results)
    if ddp:
        sections.append(ddp)
    return "\n\n".join("\n".join(section) for section in sections)
