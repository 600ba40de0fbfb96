"""Command line: ``python -m torchdyn_snopt <command>`` (installed as ``torchdyn-snopt``).

Each command is one ``_add_<name>(subparsers)`` function that builds its subparser and sets
``func`` (called with the parsed namespace, returning an exit status). A new command, or a
group with subcommands of its own (``bench image``, ``bench timeseries``), is one more such
function appended to :data:`_COMMANDS`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from torchdyn_snopt import __version__


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; accepted: an int >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; accepted: a finite float > 0")
    return value


def _add_demo(subparsers: Any) -> None:
    from torchdyn_snopt import demo

    p = subparsers.add_parser(
        "demo",
        help="train the digits Neural-ODE classifier with Adam and with SNOpt and compare",
        description=(
            "Train the conv Neural-ODE classifier on scikit-learn's 8x8 digits twice, from the "
            "same initialisation and minibatch sequence: Adam (torchdyn's adjoint) and SNOpt. "
            "Prints wall-clock, final loss, test accuracy and time to "
            f"{demo.TARGET_ACCURACY:.0%} test accuracy."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--iterations",
        type=positive_int,
        default=demo.DEFAULT_ITERATIONS,
        help="training iterations per optimizer",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data split, initial weights and minibatch order",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=demo.DEFAULT_BATCH_SIZE, help="minibatch size"
    )
    p.add_argument(
        "--lr-snopt", type=positive_float, default=demo.DEFAULT_LR_SNOPT, help="SNOpt learning rate"
    )
    p.add_argument(
        "--lr-adam", type=positive_float, default=demo.DEFAULT_LR_ADAM, help="Adam learning rate"
    )
    p.add_argument("--quiet", action="store_true", help="print nothing")

    def run(args: argparse.Namespace) -> int:
        demo.run_demo(
            iterations=args.iterations,
            seed=args.seed,
            batch_size=args.batch_size,
            lr_snopt=args.lr_snopt,
            lr_adam=args.lr_adam,
            quiet=args.quiet,
        )
        return 0

    p.set_defaults(func=run)


_COMMANDS: list[Callable[[Any], None]] = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command of :data:`_COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="torchdyn-snopt",
        description="SNOpt, the second-order Neural ODE optimizer, as a torchdyn plugin.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
