"""The ``accumfn`` command: ``accumfn demo``, ``accumfn plan`` and ``accumfn check``.

Each command is a ``Command`` in ``COMMANDS``: its arguments and the function that runs it.
Parsing imports nothing heavy, and each command imports what it needs when it runs, so
``--help``, ``plan`` and argument errors answer without importing torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

from ..errors import AccumError

__all__ = ["COMMANDS", "Command", "main"]


class Command(NamedTuple):
    """One subcommand: its name, one-line help, description, arguments, and what it runs."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    """Returns the exit code; an ``AccumError`` it raises is printed and exits with 2."""


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


# -- accumfn demo -----------------------------------------------------------------------------
def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--window", type=positive_int, default=4, metavar="N",
        help="micro-batches accumulated per optimizer step, the window (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--micro-batch", type=positive_int, default=8, metavar="B",
        help="samples (sequences, for the token model) per micro-batch (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=positive_int, default=12, metavar="S",
        help="optimizer steps per epoch, the last a short window (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--epochs", type=positive_int, default=2, metavar="E",
        help="passes over the built-in data (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=0,
        help="seed of the built-in data and the initial weights (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("accumfn-demo"), metavar="DIR",
        help="folder for metrics.jsonl, summary.json, demo.png, wandb/ (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--no-wandb", action="store_true", help="log to JSONL only (W&B logs offline otherwise)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _demo(args: argparse.Namespace) -> int:
    from ..config import clipping_text
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
    print(f"clipping: {clipping_text(settings.max_grad_norm)}, in all three runs")
    print("files:")
    for name, path in result.files.items():
        print(f"  {name:<8} {path}")
    return 0 if result.passed else 1


def _ignore_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ignore", action="append", default=[], metavar="KEY",
        help="a key of the --config section that your own code reads (repeat for more); "
        "any other key that is not a setting is an error, as in AccumulationConfig.from_yaml",
    )  # fmt: skip


# -- accumfn plan -----------------------------------------------------------------------------
def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size", type=positive_int, metavar="B",
        help="samples per micro-batch on each device (what fits in memory)",
    )  # fmt: skip
    parser.add_argument(
        "--target", type=positive_int, metavar="T",
        help="samples per optimizer step wanted, all devices together (the effective batch)",
    )  # fmt: skip
    parser.add_argument(
        "--devices", type=positive_int, default=1, metavar="D",
        help="data-parallel processes (GPUs), each running micro-batches (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--config", metavar="FILE",
        help="YAML file: the effective batch table of its batch_size and accumulation steps",
    )  # fmt: skip
    parser.add_argument(
        "--section", default="training", metavar="NAME",
        help="section of --config holding the settings, dotted for a nested one; '' for the "
        "whole file (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=positive_int, metavar="S",
        help="gradient accumulation steps, with --batch-size: the effective batch they give",
    )  # fmt: skip
    _ignore_argument(parser)
    parser.add_argument(
        "--lr", type=positive_float, metavar="LR",
        help="learning rate tuned at --base-batch: prints the scaled learning rates",
    )  # fmt: skip
    parser.add_argument(
        "--base-batch", type=positive_int, metavar="B0",
        help="the batch size --lr was tuned at",
    )  # fmt: skip
    parser.add_argument(
        "--rule", choices=["linear", "sqrt"],
        help="learning-rate scaling rule to mark in the advice (advice only)",
    )  # fmt: skip


def _plan(args: argparse.Namespace) -> int:
    from ..config import plan_text

    names = (
        "config", "section", "ignore", "batch_size", "steps", "target", "devices", "lr",
        "base_batch",
    )  # fmt: skip
    print(plan_text(rule=args.rule, **{name: getattr(args, name) for name in names}))
    return 0


# -- accumfn check ----------------------------------------------------------------------------
def _check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE",
        help="YAML file with the accumulation settings (default: batch 8 x 4 steps, clip 1.0)",
    )  # fmt: skip
    parser.add_argument(
        "--section", default="training", metavar="NAME",
        help="section of --config holding the settings, dotted for a nested one; '' for the "
        "whole file (default: %(default)s)",
    )  # fmt: skip
    _ignore_argument(parser)


def _check(args: argparse.Namespace) -> int:
    from ._check import check_command

    return check_command(args.config, args.section, args.ignore)


COMMANDS: tuple[Command, ...] = (
    Command(
        name="demo",
        help="train large-batch vs accumulated on built-in data and compare",
        description=(
            "Trains a small MLP and a small token model on built-in synthetic data three ways: "
            "one large batch per step, accumulated micro-batches (with a short final window "
            "each epoch, and ragged token counts), and a naive loop that divides each "
            "micro-batch's mean loss by the window size. Logs every effective step to JSONL "
            "(and W&B, offline unless you are logged in), plots the runs, and prints whether "
            "the accumulated parameters stayed equal to the large-batch ones. Exit code 0 "
            "when they did."
        ),
        add_arguments=_demo_arguments,
        run=_demo,
    ),
    Command(
        name="plan",
        help="window size for a target effective batch, or the table of a config file",
        description=(
            "Prints the accumulation window that turns a per-device micro-batch into a target "
            "effective batch (batch size x devices x window), and the line to write; with "
            "--config (or --batch-size and --steps), the effective batch table of those "
            "settings; with --lr and --base-batch, the learning rate scaled by the linear and "
            "square-root rules, as advice."
        ),
        add_arguments=_plan_arguments,
        run=_plan,
    ),
    Command(
        name="check",
        help="verify that accumulation works here (exit code 0 if it does)",
        description=(
            "Checks on this machine, on CPU, under the config given (default: batch_size 8, "
            "gradient_accumulation_steps 4, max_grad_norm 1.0; a file is read as "
            "AccumulationConfig.from_yaml reads it): (1) accumulated micro-batch gradients "
            "equal one large batch, (2) the accumulator's counters and windows follow the "
            "config, (3) a checkpoint saved mid-window and restored in a fresh process resumes "
            "exactly. "
            "Prints PASS/FAIL with a figure for each; exit code 0 only if all pass."
        ),
        add_arguments=_check_arguments,
        run=_check,
    ),
)
"""Every subcommand, in the order ``accumfn --help`` lists them."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accumfn",
        description="Gradient accumulation equal to large-batch training.",
        epilog="Run 'accumfn COMMAND --help' for a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name,
            help=command.help,
            description=command.description,
        )
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except AccumError as error:
        print(f"accumfn {args.command}: {error}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
