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
from torchdyn_snopt._extras import EXTRA_OF, install_hint


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


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; accepted: a finite float >= 0")
    return value


def _assignment(
    text: str, parse: Callable[[str], float], metavar: str, example: str
) -> tuple[str, float]:
    """``NAME=VALUE`` split at the first ``=``, VALUE read by the argparse type ``parse``."""
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"{text!r} is invalid; accepted: {metavar}, e.g. {example}"
        )
    return name.strip(), parse(value)


def _lr_assignment(text: str) -> tuple[str, float]:
    """argparse type: ``NAME=VALUE`` with VALUE a finite float > 0."""
    return _assignment(text, positive_float, "NAME=LR", "adam=1e-3")


def _wd_assignment(text: str) -> tuple[str, float]:
    """argparse type: ``NAME=VALUE`` with VALUE a finite float >= 0."""
    return _assignment(text, nonnegative_float, "NAME=WD", "adam=1e-4")


def _add_equal_budget_args(
    p: argparse.ArgumentParser, optimizers: Sequence[str], budget_s: float, lr_note: str = ""
) -> None:
    """``--budget-s``, ``--seeds``, ``--optimizers`` and ``--lr`` of an equal-budget bench."""
    p.add_argument(
        "--budget-s",
        type=positive_float,
        default=budget_s,
        help="training wall-clock per optimizer and seed (evaluations excluded)",
    )
    p.add_argument("--seeds", type=positive_int, default=1, help="number of seeds (0, 1, ...)")
    p.add_argument(
        "--optimizers",
        default=",".join(optimizers),
        help="comma-separated subset of " + ", ".join(optimizers),
    )
    p.add_argument(
        "--lr",
        type=_lr_assignment,
        action="append",
        default=[],
        metavar="NAME=LR",
        help="learning rate of one optimizer (repeatable)" + lr_note,
    )


def _add_session_args(
    p: argparse.ArgumentParser,
    out: str,
    files: str,
    device: str | None = "auto (CUDA when present), cpu, cuda, ...",
    quiet: str = "no progress bars or tables",
) -> None:
    """``--device`` (unless ``device`` is None), ``--out`` and ``--quiet``: the flags of a
    bench session (:class:`~torchdyn_snopt.bench.session.Session`)."""
    if device is not None:
        p.add_argument("--device", default="auto", help=device)
    p.add_argument("--out", default=out, help=f"folder for the {files}")
    p.add_argument("--quiet", action="store_true", help=quiet)


def _names(text: str) -> tuple[str, ...]:
    """The comma-separated names of ``text``, blanks dropped."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _add_bench(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="equal-wall-clock benchmarks of SNOpt vs Adam and SGD")
    groups = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    _add_bench_image(groups)
    _add_bench_horizon(groups)
    _add_bench_scaling(groups)
    _add_bench_second_order(groups)
    _add_bench_cnf(groups)
    _add_bench_timeseries(groups)
    _add_bench_suite(groups)
    _add_bench_refresh_cost(groups)


def _add_baseline_sensitivity(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--baseline-sensitivity",
        choices=("snopt", "adjoint"),
        default="snopt",
        help="backward solver of Adam/SGD: ours (never armed) or torchdyn's adjoint",
    )


def _add_bench_image(groups: Any) -> None:
    from torchdyn_snopt.bench import image

    p = groups.add_parser(
        "image",
        help="conv Neural-ODE image classifier (Fig. 1/7, Table 4, Fig. 9 with --sweep)",
        description=image.__doc__.split("\n\n")[1] if image.__doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="digits", help="digits, mnist or fashion-mnist")
    _add_equal_budget_args(p, image.OPTIMIZERS, 60.0, "; default: the dataset's sweep-best values")
    _add_session_args(p, "runs/image", "PNG, JSON and CSV")
    p.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size")
    _add_baseline_sensitivity(p)
    p.add_argument(
        "--sweep",
        action="store_true",
        help="learning-rate sweep per optimizer (and eps for SNOpt), seed 0",
    )

    def run(args: argparse.Namespace) -> int:
        image.bench_image(
            dataset=args.dataset,
            budget_s=args.budget_s,
            seeds=args.seeds,
            optimizers=_names(args.optimizers),
            lrs=dict(args.lr),
            device=args.device,
            out=args.out,
            quiet=args.quiet,
            batch_size=args.batch_size,
            baseline_sensitivity=args.baseline_sensitivity,
            sweep=args.sweep,
        )
        return 0

    p.set_defaults(func=run)


def _add_bench_cnf(groups: Any) -> None:
    from torchdyn_snopt.bench import cnf

    p = groups.add_parser(
        "cnf",
        help="FFJORD continuous normalizing flow, test NLL (Table 4, Fig. 8)",
        description=cnf.__doc__.split("\n\n")[1] if cnf.__doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="circles", choices=cnf.DATASETS)
    _add_equal_budget_args(
        p, cnf.OPTIMIZERS, 30.0, "; default: the dataset's checked values or --lr-check's picks"
    )
    p.add_argument(
        "--lr-check",
        action="store_true",
        help="first run each optimizer over a 4-5 point lr grid (seed 0) and keep the best",
    )
    p.add_argument(
        "--lr-check-s",
        type=positive_float,
        default=None,
        help="seconds per lr-check run (default: half of --budget-s)",
    )
    _add_session_args(p, "runs/cnf", "PNGs, JSON and CSV")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="minibatch size (default per set)"
    )
    _add_baseline_sensitivity(p)

    def run(args: argparse.Namespace) -> int:
        cnf.bench_cnf(
            dataset=args.dataset,
            budget_s=args.budget_s,
            seeds=args.seeds,
            optimizers=_names(args.optimizers),
            lrs=dict(args.lr),
            device=args.device,
            out=args.out,
            quiet=args.quiet,
            batch_size=args.batch_size,
            baseline_sensitivity=args.baseline_sensitivity,
            lr_check=args.lr_check,
            lr_check_s=args.lr_check_s,
        )
        return 0

    p.set_defaults(func=run)


def _float_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated finite floats > 0 (empty: none)."""
    return tuple(positive_float(v) for v in text.split(",") if v.strip())


def _add_bench_horizon(groups: Any) -> None:
    from torchdyn_snopt.bench import horizon

    p = groups.add_parser(
        "horizon",
        help="fixed t1 vs t1 learned by the first-order rule and the feedback policy "
        "(Table 5, Fig. 5/10)",
        description=horizon.__doc__.split("\n\n")[1] if horizon.__doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="digits", help="digits, mnist or fashion-mnist")
    p.add_argument("--epochs", type=positive_int, default=horizon.DEFAULT_EPOCHS)
    p.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument(
        "--policies",
        default=",".join(horizon.POLICIES),
        help="comma-separated subset of " + ", ".join(horizon.POLICIES),
    )
    p.add_argument(
        "--fixed-t1",
        type=_float_list,
        default=horizon.DEFAULT_FIXED_T1,
        help="extra fixed horizons, comma-separated (Fig. 5 analogue); '' for none",
    )
    p.add_argument("--optimizer", default="snopt", help="adam, sgd or snopt (all runs)")
    p.add_argument("--lr", type=positive_float, default=None, help="default: bench image's")
    p.add_argument(
        "--tol", type=positive_float, default=horizon.DEFAULT_TOL, help="dopri5 atol = rtol"
    )
    p.add_argument(
        "--penalty",
        type=positive_float,
        default=None,
        help="c of the c/2·T² penalty for both learned policies (default: "
        f"{horizon.HORIZON_OPTIONS['feedback']['penalty']:g})",
    )
    p.add_argument(
        "--weight-decay",
        type=nonnegative_float,
        default=horizon.DEFAULT_WEIGHT_DECAY,
        help="weight decay γ of every run (all parameters, all policies)",
    )
    _add_session_args(p, "runs/horizon", "PNG and JSON", quiet="print nothing")
    p.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size")

    def run(args: argparse.Namespace) -> int:
        horizon.bench_horizon(
            dataset=args.dataset,
            epochs=args.epochs,
            seeds=args.seeds,
            policies=_names(args.policies),
            fixed_t1=args.fixed_t1,
            optimizer=args.optimizer,
            lr=args.lr,
            device=args.device,
            out=args.out,
            batch_size=args.batch_size,
            quiet=args.quiet,
            tol=args.tol,
            horizon_options=None if args.penalty is None else {"penalty": args.penalty},
            weight_decay=args.weight_decay,
        )
        return 0

    p.set_defaults(func=run)


def _world_sizes(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated ints >= 1, e.g. ``1,2``."""
    return tuple(positive_int(part.strip()) for part in text.split(",") if part.strip())


def _add_bench_scaling(groups: Any) -> None:
    from torchdyn_snopt.bench import scaling

    defaults = scaling.ScalingConfig()
    p = groups.add_parser(
        "scaling",
        help="time per iteration and communication share of SNOpt under DDP, 1 vs N processes",
        description=scaling.__doc__.split("\n\n")[1] if scaling.__doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--world-sizes",
        type=_world_sizes,
        default=(1, 2),
        help="process counts to time, e.g. 1,2,4 (1 is always timed; under torchrun the "
        "sizes up to its job's, plus the whole job)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=defaults.batch_size, help="images per process"
    )
    p.add_argument("--iters", type=positive_int, default=defaults.iters, help="timed iterations")
    p.add_argument(
        "--warmup", type=int, default=defaults.warmup, help="untimed iterations before them"
    )
    p.add_argument(
        "--update-freq",
        type=positive_int,
        default=defaults.update_freq,
        help="SNOpt curvature refresh period",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=defaults.threads,
        help="intra-op CPU threads per process",
    )
    p.add_argument(
        "--distribute-eigh",
        action="store_true",
        help="split the eigendecompositions of a refresh across ranks",
    )
    _add_session_args(
        p,
        "runs/scaling",
        "scaling.json",
        device="auto (one GPU per process when enough), cpu, cuda",
        quiet="print nothing",
    )

    def run(args: argparse.Namespace) -> int:
        cfg = scaling.ScalingConfig(
            batch_size=args.batch_size,
            iters=args.iters,
            warmup=args.warmup,
            update_freq=args.update_freq,
            threads=args.threads,
            distribute_eigh=args.distribute_eigh,
        )
        scaling.bench_scaling(
            world_sizes=args.world_sizes,
            cfg=cfg,
            device=args.device,
            out=args.out,
            quiet=args.quiet,
        )
        return 0

    p.set_defaults(func=run)


def _add_bench_second_order(groups: Any) -> None:
    from torchdyn_snopt.bench import second_order

    p = groups.add_parser(
        "second-order",
        help="SNOpt vs Newton-CG on exact and on recursive-adjoint Hessian products (Fig. 11)",
        description=second_order.__doc__.split("\n\n")[1] if second_order.__doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_equal_budget_args(p, second_order.OPTIMIZERS, 20.0)
    _add_session_args(p, "runs/second_order", "PNG, JSON and CSV", device=None)
    p.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size")

    def run(args: argparse.Namespace) -> int:
        second_order.bench_second_order(
            budget_s=args.budget_s,
            seeds=args.seeds,
            optimizers=_names(args.optimizers),
            lrs=dict(args.lr),
            out=args.out,
            quiet=args.quiet,
            batch_size=args.batch_size,
        )
        return 0

    p.set_defaults(func=run)


def _add_bench_timeseries(groups: Any) -> None:
    from torchdyn_snopt.bench import timeseries
    from torchdyn_snopt.data import UEA_DATASETS

    p = groups.add_parser(
        "timeseries",
        help="ODE-RNN or Neural CDE on UEA series (Table 3/4, Fig. 6)",
        description=timeseries.__doc__.split("\n\n")[1] if timeseries.__doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", choices=UEA_DATASETS, default="JapaneseVowels")
    p.add_argument("--model", choices=timeseries.MODELS, default="odernn")
    _add_equal_budget_args(p, timeseries.OPTIMIZERS, 30.0, "; default: the sweep-best values")
    _add_session_args(p, "runs/timeseries", "PNG, JSON and CSV")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="minibatch size (default: 40 for BasicMotions, 64 for JapaneseVowels)",
    )
    p.add_argument(
        "--weight-decay",
        type=_wd_assignment,
        action="append",
        default=[],
        metavar="NAME=WD",
        help="weight decay of one optimizer (repeatable; L2 on the loss: Adam's and SGD's "
        "weight_decay, SNOpt's γ); default: the setting's checked values",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="learning-rate check per optimizer, seed 0, no weight decay",
    )
    p.add_argument(
        "--sweep-wd",
        action="store_true",
        help="weight-decay check per optimizer at its learning rate, seed 0",
    )
    p.add_argument(
        "--path-scale",
        type=float,
        default=None,
        help="factor on the Neural CDE path's value channels (default: 0.1 for BasicMotions, "
        "1 for JapaneseVowels)",
    )

    def run(args: argparse.Namespace) -> int:
        timeseries.bench_timeseries(
            dataset=args.dataset,
            model=args.model,
            budget_s=args.budget_s,
            seeds=args.seeds,
            optimizers=_names(args.optimizers),
            lrs=dict(args.lr),
            weight_decays=dict(args.weight_decay),
            device=args.device,
            out=args.out,
            quiet=args.quiet,
            batch_size=args.batch_size,
            sweep=args.sweep,
            sweep_wd=args.sweep_wd,
            path_scale=args.path_scale,
        )
        return 0

    p.set_defaults(func=run)


def _choices(accepted: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """argparse type: a comma-separated, non-empty subset of ``accepted``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in names if v not in accepted]
        if bad or not names:
            why = f"unknown {what} {', '.join(map(repr, bad))}" if bad else "empty"
            raise argparse.ArgumentTypeError(
                f"{text!r} is invalid ({why}); accepted: a comma-separated subset of "
                + ", ".join(accepted)
            )
        return names

    return parse


def _add_bench_suite(groups: Any) -> None:
    from torchdyn_snopt.bench import suite

    p = groups.add_parser(
        "suite",
        help="SNOpt vs Adam, SGD and SOAP on nine Neural-ODE tasks, training loss vs wall-clock",
        description=suite.__doc__.split("\n\n")[1] if suite.__doc__ else None,
    )
    p.add_argument(
        "--tasks",
        type=_choices(tuple(suite.TASKS), "task"),
        default=tuple(suite.TASKS),
        help="comma-separated subset of " + ", ".join(suite.TASKS) + " (default: all)",
    )
    p.add_argument(
        "--optimizers",
        type=_choices(suite.SUITE_OPTIMIZERS, "optimizer"),
        default=suite.SUITE_OPTIMIZERS,
        help="comma-separated subset of " + ", ".join(suite.SUITE_OPTIMIZERS) + " (default: all)",
    )
    p.add_argument(
        "--budget-s",
        type=positive_float,
        default=None,
        help=f"training wall-clock per run (evaluations pause the clock); default "
        f"{suite.DEFAULT_BUDGET_S:g} ({suite.QUICK_BUDGET_S:g} with --quick). All 9 tasks x 5 "
        f"optimizers x {suite.DEFAULT_SEEDS} seeds = 135 runs: 135 x {suite.DEFAULT_BUDGET_S:g} "
        "s of training + about 360 s of evaluations and set-up = about 47 min on this 2-core "
        "machine (under 53 min if the trained ODEs need twice the steps to evaluate)",
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help=f"number of seeds (0, 1, ...); default {suite.DEFAULT_SEEDS} (1 with --quick)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: one seed, {suite.QUICK_BUDGET_S:g} s per run unless given",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--sweep",
        action="store_true",
        help="seed 0 of each tuned optimizer (adam, sgd, soap, snopt; never snopt-default, "
        "which has no rate to tune and stays SNOpt(model)) over its 5-point log grid of rates "
        "(--grid-budget-s each); writes the best rate per task to --rates",
    )
    mode.add_argument(
        "--lr-sensitivity",
        action="store_true",
        help=f"final training loss over {suite.SENSITIVITY_POINTS} rates per optimizer "
        "spanning its grid's range, and the usable range per optimizer and task (within 2x "
        "of the best, neither diverged nor stalled); one PNG. snopt-default is included: "
        "SNOpt(model, lr=lr) with every other argument at its default, over 0.005-0.5 "
        "around SNOpt's default rate 0.05 (the rates file's 'snopt-default' grid)",
    )
    p.add_argument(
        "--grid-budget-s",
        type=positive_float,
        default=None,
        help=f"training wall-clock per grid run; default {suite.DEFAULT_GRID_BUDGET_S:g} "
        f"({suite.QUICK_BUDGET_S:g} with --quick). Each run takes this plus about "
        f"{suite.GRID_RUN_OVERHEAD_S:g} s of evaluations and set-up (measured: 180 runs at 4 s "
        "took 23 min on this 2-core machine); all 9 tasks are 99 runs per optimizer with "
        "--lr-sensitivity, 45 with --sweep",
    )
    p.add_argument(
        "--rates",
        default=str(suite.RATES_PATH),
        help="JSON file of the grids and per-task rates (read; --sweep rewrites it); default: "
        "the packaged suite_rates.json",
    )
    _add_session_args(p, "runs/suite", "markdown, JSON and PNG (runs/suite)", device=None)

    def run(args: argparse.Namespace) -> int:
        suite.bench_suite(
            tasks=args.tasks,
            optimizers=args.optimizers,
            budget_s=args.budget_s,
            seeds=args.seeds,
            quick=args.quick,
            sweep=args.sweep,
            lr_sensitivity=args.lr_sensitivity,
            grid_budget_s=args.grid_budget_s,
            rates_path=args.rates,
            out=args.out,
            quiet=args.quiet,
            command=" ".join(["torchdyn-snopt", *args.argv]),
        )
        return 0

    p.set_defaults(func=run)


def _add_bench_refresh_cost(groups: Any) -> None:
    from torchdyn_snopt.bench import refresh_cost

    defaults = refresh_cost.RefreshCostConfig()
    p = groups.add_parser(
        "refresh-cost",
        help="s/iter of Adam and SNOpt (not armed, armed exact/power, amortized) vs layer width",
        description=refresh_cost.__doc__.split("\n\n")[1] if refresh_cost.__doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--widths",
        type=_world_sizes,
        default=None,
        help="MLP hidden widths, e.g. 64,256,1024 (default: "
        + ",".join(map(str, refresh_cost.WIDTHS))
        + "; with --quick "
        + ",".join(map(str, refresh_cost.QUICK_WIDTHS))
        + ")",
    )
    p.add_argument(
        "--channels",
        type=_world_sizes,
        default=None,
        help="conv channel counts (default: "
        + ",".join(map(str, refresh_cost.CHANNELS))
        + "; with --quick "
        + ",".join(map(str, refresh_cost.QUICK_CHANNELS))
        + ")",
    )
    p.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help=f"timed iterations per variant, the minimum is kept (default {defaults.repeats}; "
        "with --quick 1)",
    )
    p.add_argument("--threads", type=positive_int, default=defaults.threads, help="CPU threads")
    p.add_argument("--quick", action="store_true", help="few sizes, one timed iteration")
    _add_session_args(p, "runs/refresh_cost", "JSON and PNG", device=None, quiet="print nothing")

    def run(args: argparse.Namespace) -> int:
        repeats = args.repeats or (1 if args.quick else defaults.repeats)
        cfg = refresh_cost.RefreshCostConfig(repeats=repeats, threads=args.threads)
        refresh_cost.bench_refresh_cost(
            widths=args.widths,
            channels=args.channels,
            cfg=cfg,
            out=args.out,
            quick=args.quick,
            quiet=args.quiet,
        )
        return 0

    p.set_defaults(func=run)


def _add_report(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report",
        help="turn benchmark JSON into markdown pages (and the README's results table)",
        description=(
            "Read the JSON of benchmark runs (a bench suite output directory with suite.json, "
            "or the JSON of bench image/timeseries/cnf) and write one markdown page per run, "
            "with its PNG, under --out, plus index.md. With --readme, replace the README's "
            "generated results block by the suite's table. Every number comes from the files."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("runs", nargs="+", help="run directories or JSON files")
    p.add_argument("--out", default="docs/benchmarks", help="directory of the pages")
    p.add_argument("--readme", default=None, help="README whose results block to regenerate")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from torchdyn_snopt.bench.report import report

        readme = Path(args.readme) if args.readme else None
        for path in report([Path(r) for r in args.runs], Path(args.out), readme):
            print(path)
        return 0

    p.set_defaults(func=run)


_COMMANDS: list[Callable[[Any], None]] = [_add_demo, _add_bench, _add_report]


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
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status.

    A command whose optional dependency (plotting, progress bars, datasets, torchcde) is not
    installed exits with status 1 and a message naming the extra that installs it.
    """
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the records of a run
    try:
        status: int = args.func(args)
    except ModuleNotFoundError as err:
        missing = (err.name or "").partition(".")[0]
        if missing not in EXTRA_OF:
            raise
        print(
            f"torchdyn-snopt {args.command}: {missing} is not installed: {install_hint(missing)}"
            f"\n({err})",
            file=sys.stderr,
        )
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
