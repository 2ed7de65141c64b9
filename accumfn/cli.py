"""The ``accumfn`` command: ``accumfn demo`` and ``accumfn plan``."""

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
    plan.add_argument("--batch-size", type=_positive_int, required=True, help="per device")
    plan.add_argument("--target", type=_positive_int, required=True, help="effective batch")
    plan.add_argument("--devices", type=_positive_int, default=1)
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
    from .plan import format_plan, plan_window

    print(format_plan(plan_window(args.batch_size, args.target, args.devices)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _demo(args) if args.command == "demo" else _plan(args)
    except AccumError as error:
        print(f"accumfn {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
