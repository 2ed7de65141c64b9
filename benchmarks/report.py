"""The results as Markdown tables, the form docs/benchmarks.md shows."""

from __future__ import annotations

from typing import Any

__all__ = ["table"]


def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _timing_rows(results: dict[str, Any]) -> list[str]:
    rows = ["| workload | loop | ms / micro-step | ratio to hand |", "|---|---|---:|---:|"]
    for name, timing in results["timing"].items():
        for loop, row in timing.items():
            if "not_available" in row:
                rows.append(f"| {name} | {loop} | not available | |")
            else:
                rows.append(
                    f"| {name} | {loop} | {row['ms_per_micro_step']:.3f} "
                    f"| {row['ratio_to_hand']:.3f} |"
                )
    return rows


def _ratio_rows(results: dict[str, Any]) -> list[str]:
    pairs = list(next(iter(results["ratios"].values())))
    rows = ["| ratio (median of paired repeats) | " + " | ".join(results["ratios"]) + " |"]
    rows.append("|---|" + "---:|" * len(results["ratios"]))
    for pair in pairs:
        cells = [_num(results["ratios"][name][pair]) for name in results["ratios"]]
        rows.append(f"| {pair} | " + " | ".join(cells) + " |")
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
            rows.append(
                f"| {name} | {loop} | {_num(row['peak_rss_mib'], 1 if '/' not in loop else 3)} "
                f"| {_num(row['training_mib'], 1 if '/' not in loop else 3)} |"
            )
    return rows


def _ddp_rows(results: dict[str, Any]) -> list[str]:
    ddp = results["ddp"]
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
        f"Window {s['window']}, {s['windows']} windows x {s['repeats']} repeats, alternating."
    )
    o = results["overhead"]
    overhead = (
        f"accumfn's own cost per micro-step (Linear(4, 4), best of repeats): hand "
        f"{o['hand_us']:.1f} us, accumfn +{o['accumfn_extra_us']:.1f} us, "
        f"GradientAccumulator +{o['accumulator_extra_us']:.1f} us"
    )
    sections = [
        [head],
        [overhead],
        ["Time per micro-step", *_timing_rows(results)],
        ["Ratios", *_ratio_rows(results)],
        ["Host-device syncs", *_sync_rows(results)],
        ["Peak memory (fresh process per loop; ratios in the a/b rows)", *_memory_rows(results)],
        _ddp_rows(results),
    ]
    return "\n\n".join("\n".join(section) for section in sections)
