"""The ``accumfn`` command: ``accumfn demo``, ``accumfn plan`` and ``accumfn check``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import AccumError

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accumfn", description="Gradient accumulation equal to large-batch training."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="train large-batch vs accumulated on built-in data and compare",
        description=(
            "Trains a small MLP and a small token model on built-in synthetic data twice: one "
            "large batch per step, and accumulated micro-batches (with a short final window "
            "each epoch, and ragged token counts). Logs to W&B offline and JSONL, plots both, "
            "and prints whether the parameters stayed equal."
        ),
    )
    demo.add_argument("--window", type=_positive_int, default=4, help="micro-batches per step")
    demo.add_argument("--micro-batch", type=_positive_int, default=8, help="samples per micro")
    demo.add_argument("--steps", type=_positive_int, default=12, help="optimizer steps per epoch")
    demo.add_argument("--epochs", type=_positive_int, default=2)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", type=Path, default=Path("accumfn-demo"), help="output directory")
    demo.add_argument("--no-wandb", action="store_true", help="log to JSONL only")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    plan = commands.add_parser(
        "plan",
        help="window size for a target effective batch",
        description="Prints the accumulation window that turns a physical batch into a target.",
    )
    plan.add_argument("--batch-size", type=_positive_int, help="per device")
    plan.add_argument("--target", type=_positive_int, help="effective batch")
    plan.add_argument("--devices", type=_positive_int, default=1)
    plan.add_argument("--config", help="YAML file: the effective batch table of its settings")
    plan.add_argument("--section", default="training", help="section of --config")
    plan.add_argument("--steps", type=_positive_int, help="accumulation steps (with --batch-size)")
    plan.add_argument("--lr", type=_positive_float, help="learning rate tuned at --base-batch")
    plan.add_argument("--base-batch", type=_positive_int, help="batch size --lr was tuned at")
    plan.add_argument("--rule", choices=["linear", "sqrt"], help="LR scaling rule to mark")
    check = commands.add_parser(
        "check",
        help="verify that accumulation works here (exit code 0 if it does)",
        description=(
            "Checks on this machine, on CPU, under the config given (default: batch_size 8, "
            "gradient_accumulation_steps 4): (1) accumulated micro-batch gradients equal one "
            "large batch, (2) the accumulator's counters and windows follow the config, (3) a "
            "checkpoint saved mid-window and restored in a fresh process resumes exactly. "
            "Prints PASS/FAIL with a figure for each; exit code 0 only if all pass."
        ),
    )
    check.add_argument("--config", help="YAML file with the accumulation settings")
    check.add_argument("--section", default="training", help="section of --config")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(
        window=args.window,
        micro_batch=args.micro_batch,
        steps=args.steps,
        epochs=args.epochs,
        seed=args.seed,
    )
    result = run_demo(
        settings, args.out, use_wandb=not args.no_wandb, progress=not args.no_progress
    )
    print(result.verdict)
    print("files:")
    for name, path in result.files.items():
        print(f"  {name:<8} {path}")
    return 0 if result.passed else 1


def _plan(args: argparse.Namespace) -> int:
    from .config_plan import plan_text

    names = ("config", "section", "batch_size", "steps", "target", "devices", "lr", "base_batch")
    print(plan_text(rule=args.rule, **{name: getattr(args, name) for name in names}))
    return 0


def _check(args: argparse.Namespace) -> int:
    from ._check import check_command

    return check_command(args.config, args.section)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"demo": _demo, "plan": _plan, "check": _check}[args.command](args)
    except AccumError as error:
        print(f"accumfn {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
