"""``torchdyn-snopt bench suite``: SNOpt vs Adam, SGD and SOAP on nine Neural-ODE tasks.

Every optimizer trains each of the nine tasks (``bench/suite_tasks.py``) for the same
training wall-clock, from the same initial weights (torch seeded with the seed) with the same
minibatch stream (a generator seeded per task and seed); evaluations pause the clock. The
headline is training loss against wall-clock: per seed, the time an optimizer needs to reach
tuned Adam's final training loss, as a multiple of Adam's own time. ``snopt`` is SNOpt with
the paper's fixed Tikhonov damping at its tuned rate; ``snopt-default`` is ``SNOpt(model)``
with nothing tuned. ``--lr-sensitivity`` maps final training loss over a log grid of rates
(``snopt-default`` included: SNOpt with every argument at its default but ``lr``); ``--sweep``
runs the tuned optimizers' grids and stores each one's best rate per task in the rates file.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchdyn_snopt.bench.optimizers import (
    SNOPT_REFERENCE_LR,
    require_soap,
    snopt_default_lr,
    snopt_lr_has_default,
)
from torchdyn_snopt.bench.provenance import environment
from torchdyn_snopt.bench.records import RunResult
from torchdyn_snopt.bench.session import Session
from torchdyn_snopt.bench.suite_tasks import TASKS, Task
from torchdyn_snopt.bench.trial import STALL, TRAIN_CURVE, Trial, batch_seed, flag_run, run_trial

__all__ = ["STALL", "Trial", "batch_seed", "bench_suite", "flag_run", "run_trial"]

#: The compared optimizers, in table order; ``adam`` is the reference of time-to-loss.
SUITE_OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "soap", "snopt", "snopt-default")
#: Optimizers with a tuned rate (``snopt-default`` has none by design).
TUNED: tuple[str, ...] = ("adam", "sgd", "soap", "snopt")
#: Optimizers ``--lr-sensitivity`` runs over a grid: the tuned ones and ``snopt-default``
#: (``SNOpt(model, lr=lr)``, every other argument at its default; never tuned by ``--sweep``).
SENSITIVITY_OPTIMIZERS: tuple[str, ...] = (*TUNED, "snopt-default")
#: Training seconds per run. A full run (9 tasks x 5 optimizers x 3 seeds = 135 runs):
#: 135 x 18 s = 2,430 s of training, plus evaluations and set-up measured at about 550 s in
#: all on one core (per run: 25 training-loss evaluations and one test evaluation; 5.4-12 s
#: for the image tasks, 0.7-2.8 s for the others, 62 s for SGD's diverged Fashion-MNIST run):
#: about 50 min, and under 60 min should the trained ODEs need twice the solver steps to
#: evaluate.
DEFAULT_BUDGET_S = 18.0
DEFAULT_SEEDS = 3
#: Training seconds per run of ``--sweep`` / ``--lr-sensitivity`` (one seed; 5 / 11 rates per
#: optimizer and task: 45 / 99 runs per optimizer over the nine tasks).
DEFAULT_GRID_BUDGET_S = 5.0
#: Seconds per grid run besides its training budget (evaluations, set-up), measured: the
#: committed ``--sweep --grid-budget-s 4`` (180 runs) took 1,389 s on a 2-core machine, 7.7 s a
#: run (more if large rates make the ODEs stiff).
GRID_RUN_OVERHEAD_S = 3.7
#: ``--quick``: one seed, this many seconds per run (both kinds of run).
QUICK_BUDGET_S = 2.0
#: Evaluations of the training loss per run (plus one at 0 s); fewer in a grid run. A time
#: to a loss is resolved to ``budget / N_EVALS`` (with 12, every ratio to Adam's time sat just
#: above a multiple of 1/12; 24 halves that step for every optimizer alike).
N_EVALS, GRID_EVALS = 24, 5
#: A rate is usable when its final training loss is within this factor of the grid's best
#: (``loss − best <= (USABLE − 1) |best|``, so NLLs below 0 work too) and its run neither
#: failed nor stalled (the stall rule keeps an NLL's arbitrary offset from making every rate
#: "within 2x").
USABLE = 2.0
RATES_PATH = Path(__file__).with_name("suite_rates.json")


def _names(value: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)


def check_suite_args(
    tasks: Sequence[str], optimizers: Sequence[str], budget_s: float, seeds: int
) -> None:
    """ValueError naming the argument, its value and the accepted values unless ``tasks`` and
    ``optimizers`` are non-empty subsets of :data:`TASKS` and :data:`SUITE_OPTIMIZERS`,
    ``budget_s`` a finite float > 0 and ``seeds`` an int >= 1; ImportError naming the
    ``bench`` extra when ``soap`` is asked for and ``pytorch_optimizer`` is missing."""
    for arg, given, accepted in (
        ("tasks", tasks, tuple(TASKS)),
        ("optimizers", optimizers, SUITE_OPTIMIZERS),
    ):
        bad = [v for v in given if v not in accepted]
        if bad or not given:
            raise ValueError(
                f"{arg}={','.join(given)!r} is invalid"
                + (f" ({', '.join(map(repr, bad))} unknown)" if bad else " (empty)")
                + f"; accepted: a non-empty subset of {', '.join(accepted)}"
            )
    ok = isinstance(budget_s, (int, float)) and not isinstance(budget_s, bool)
    if not (ok and math.isfinite(budget_s) and budget_s > 0):
        raise ValueError(f"budget_s={budget_s!r} is invalid; accepted: a finite float > 0")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r} is invalid; accepted: an int >= 1")
    if "soap" in optimizers:
        require_soap()


# --------------------------------------------------------------------------- rates


def load_rates(path: str | Path = RATES_PATH) -> dict[str, Any]:
    """The rates file: ``{"grid": {optimizer: {"low", "high", "points"}}, "rates": {task:
    {optimizer: {"lr", "source", "note"}}}, "sweeps": {task: {...}}}``."""
    with open(path) as fh:
        return json.load(fh)


def rate_of(rates: dict[str, Any], task: str, optimizer: str) -> tuple[float, str]:
    """``(lr, source)`` of ``optimizer`` on ``task``: the rates file's entry, or for
    ``snopt-default`` the rate ``SNOpt(model)`` uses (``"default"``) or, while ``lr`` has no
    default, :data:`SNOPT_REFERENCE_LR` (``"reference"``)."""
    if optimizer == "snopt-default":
        default = snopt_default_lr()
        return (SNOPT_REFERENCE_LR, "reference") if default is None else (default, "default")
    entry = rates["rates"][task][optimizer]
    return float(entry["lr"]), str(entry["source"])


#: Rates of ``--lr-sensitivity``'s grid per optimizer (over the rates file's range); the
#: ``--sweep`` that picks the suite's rates uses the file's own ``points`` (coarser, cheaper).
SENSITIVITY_POINTS = 11


def lr_grid(rates: dict[str, Any], optimizer: str, points: int | None = None) -> list[float]:
    """The log grid of ``optimizer`` from the rates file: ``points`` rates (default the file's
    own), both ends in."""
    g = rates["grid"][optimizer]
    lo, hi = math.log10(g["low"]), math.log10(g["high"])
    n = int(g["points"]) if points is None else points
    return [float(f"{10 ** (lo + (hi - lo) * i / (n - 1)):.3g}") for i in range(n)]


SNOPT_DEFAULT_NOTE = (
    "snopt-default is SNOpt(model) with no other argument; until SNOpt has defaults for "
    f"every argument (today lr has none) the suite passes lr={SNOPT_REFERENCE_LR:g}, the "
    "implementation notes' reference rate of the released image experiments (not a tuned rate)"
)


# --------------------------------------------------------------------------- one run


def suite_trial(task: Task, optimizer: str, lr: float, seed: int, budget_s: float,
                n_evals: int = N_EVALS) -> Trial:  # fmt: skip
    """One run of the suite: the train-curve protocol (see :mod:`~torchdyn_snopt.bench.trial`)
    with ``n_evals`` training-loss evaluations (plus one at 0 s)."""
    return Trial(task, optimizer, lr, seed, budget_s, protocol=TRAIN_CURVE, n_evals=n_evals)


def _line(trial: Trial, r: RunResult) -> str:
    from torchdyn_snopt.bench import suite_report as report

    return "  " + report.run_line(trial.seed, r)


def final_loss(r: RunResult) -> float:
    """Final logged training loss; NaN for a run without points."""
    return r.points[-1].train_loss if r.points else math.nan


def time_to_loss(r: RunResult, target: float) -> float:
    """Training seconds at the first logged point with training loss ``<= target``
    (inf: never; NaN when ``target`` is NaN)."""
    if math.isnan(target):
        return math.nan
    return next((p.seconds for p in r.points if p.train_loss <= target), math.inf)


def adam_ratios(runs: list[RunResult], reference: str = "adam") -> dict[tuple[str, int], float]:
    """Per ``(optimizer, seed)``: time to reach the reference's final training loss of the
    same seed divided by the reference's own (first) time to reach it. inf: never reached;
    NaN: no reference run, or it failed, or it reached its final loss at 0 s (no progress)."""
    ref = {r.seed: r for r in runs if r.optimizer == reference}
    out: dict[tuple[str, int], float] = {}
    for r in runs:
        base = ref.get(r.seed)
        target = final_loss(base) if base is not None and not base.error else math.nan
        own = time_to_loss(base, target) if base is not None else math.nan
        t = time_to_loss(r, target)
        ok = math.isfinite(own) and own > 0 and not math.isnan(t)
        out[(r.optimizer, r.seed)] = t / own if ok else math.nan
    return out


def median(values: Sequence[float]) -> float:
    """Median of the non-NaN ``values`` (inf counts as the largest); NaN when none."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if math.isfinite(v)]
    return sum(kept) / len(kept) if kept else math.nan


def task_rows(task: Task, runs: list[RunResult], sources: dict[str, str]) -> list[dict[str, Any]]:
    """One row per optimizer of ``task``: rate and its source, seeds, mean final training
    loss and test metric over seeds, median seconds and x-Adam ratio to Adam's final loss,
    seeds that reached it, diverged/stalled counts, s/iter and NFE per iteration."""
    ratios = adam_ratios(runs)
    targets = {r.seed: final_loss(r) for r in runs if r.optimizer == "adam" and not r.error}
    rows = []
    for name in dict.fromkeys(r.optimizer for r in runs):
        rs = [r for r in runs if r.optimizer == name]
        times = [time_to_loss(r, targets.get(r.seed, math.nan)) for r in rs]
        metric = [
            (r.points[-1].test_acc if task.metric == "accuracy" else r.points[-1].test_loss)
            for r in rs
            if r.points
        ]
        rows.append(
            {
                "optimizer": name,
                "lr": rs[0].lr,
                "lr_source": sources.get(name, ""),
                "seeds": len(rs),
                "final_train_loss": _mean([final_loss(r) for r in rs]),
                f"test_{task.metric}": _mean(metric),
                "s_to_adam_loss": median(times),
                "x_adam_time": median([ratios[(name, r.seed)] for r in rs]),
                "reached": sum(1 for t in times if math.isfinite(t)),
                "diverged": sum(int(r.extra.get("diverged", 0)) for r in rs),
                "stalled": sum(int(r.extra.get("stalled", 0)) for r in rs),
                "s_per_iter": _mean([r.seconds_per_iter for r in rs if r.iterations]),
                "nfe_forward": _mean([r.nfe_forward for r in rs]),
                "nfe_backward": _mean([r.nfe_backward for r in rs]),
            }
        )
    return rows


def overall(summary: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per task the winner in time-to-Adam's-loss (smallest median ratio; ties: lower mean
    final training loss; none when no ratio is finite), and per optimizer the median of its
    per-task ratios and its number of wins."""
    winners: dict[str, str | None] = {}
    for task, rows in summary.items():
        ranked = [r for r in rows if math.isfinite(r["x_adam_time"])]
        ranked.sort(key=lambda r: (r["x_adam_time"], r["final_train_loss"]))
        winners[task] = ranked[0]["optimizer"] if ranked else None
    names = list(dict.fromkeys(r["optimizer"] for rows in summary.values() for r in rows))
    return {
        "winners": winners,
        "median_x_adam_time": {
            n: median(
                [r["x_adam_time"] for rows in summary.values() for r in rows if r["optimizer"] == n]
            )
            for n in names
        },
        "wins": {n: sum(1 for w in winners.values() if w == n) for n in names},
    }


# --------------------------------------------------------------------------- learning-rate grids


def usable_range(points: list[tuple[float, float, bool]]) -> dict[str, float]:
    """From ``(lr, final training loss, failed)`` of one optimizer's grid on one task: the best
    rate and loss, and the usable rates (not failed, loss within :data:`USABLE` of the best):
    ``low``, ``high``, ``ratio = high / low`` and their ``count`` (NaN/0 when none)."""
    ok = [(lr, loss) for lr, loss, failed in points if not failed and math.isfinite(loss)]
    if not ok:
        nan = math.nan
        return {"best_lr": nan, "best_loss": nan, "low": nan, "high": nan, "ratio": nan, "count": 0}
    best_lr, best = min(ok, key=lambda p: p[1])
    usable = [lr for lr, loss in ok if loss - best <= (USABLE - 1) * abs(best)]
    return {
        "best_lr": best_lr,
        "best_loss": best,
        "low": min(usable),
        "high": max(usable),
        "ratio": max(usable) / min(usable),
        "count": len(usable),
    }


def grid_rows(runs: list[tuple[str, RunResult]]) -> list[dict[str, Any]]:
    """One row per grid run: task, optimizer, lr, final training loss, flags, iterations."""
    return [
        {
            "task": task,
            "optimizer": r.optimizer,
            "lr": r.lr,
            "final_train_loss": final_loss(r),
            "diverged": int(r.extra.get("diverged", 0)),
            "stalled": int(r.extra.get("stalled", 0)),
            "iterations": r.iterations,
            "error": r.error,
        }
        for task, r in runs
    ]


def sensitivity(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {optimizer: usable_range(...)}}`` of :func:`grid_rows`' rows (a diverged or
    stalled run counts as failed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        out.setdefault(row["task"], {}).setdefault(row["optimizer"], [])  # type: ignore[arg-type]
    for task, per in out.items():
        for name in per:
            pts = [
                (r["lr"], r["final_train_loss"], bool(r["diverged"] or r["stalled"]))
                for r in rows
                if r["task"] == task and r["optimizer"] == name
            ]
            per[name] = usable_range(pts)
    return out


def swept_rates(
    rates: dict[str, Any], rows: list[dict[str, Any]], budget_s: float
) -> dict[str, Any]:
    """``rates`` with each swept (task, optimizer) set to its lowest final training loss among
    the runs that neither failed nor stalled (``"source": "sweep"``); a pair without such a
    run keeps its entry. ``sweeps[task]`` records the date, budget and seed."""
    new = json.loads(json.dumps(rates))
    date = _dt.date.today().isoformat()
    for task in dict.fromkeys(r["task"] for r in rows):
        for name in dict.fromkeys(r["optimizer"] for r in rows if r["task"] == task):
            ok = [
                r
                for r in rows
                if r["task"] == task
                and r["optimizer"] == name
                and not (r["diverged"] or r["stalled"])
                and math.isfinite(r["final_train_loss"])
            ]
            if ok:
                best = min(ok, key=lambda r: r["final_train_loss"])
                new["rates"].setdefault(task, {})[name] = {
                    "lr": best["lr"],
                    "source": "sweep",
                    "note": f"lowest final training loss, {budget_s:g} s per run, seed 0 ({date})",
                }
        new["sweeps"][task] = {"date": date, "budget_s": budget_s, "seed": 0}
    return new


# --------------------------------------------------------------------------- the command


def bench_suite(
    tasks: str | Sequence[str] = tuple(TASKS),
    optimizers: str | Sequence[str] = SUITE_OPTIMIZERS,
    budget_s: float | None = None,
    seeds: int | None = None,
    quick: bool = False,
    sweep: bool = False,
    lr_sensitivity: bool = False,
    grid_budget_s: float | None = None,
    rates_path: str | Path = RATES_PATH,
    out: str | Path = "runs/suite",
    quiet: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Run the suite (or, with ``sweep`` / ``lr_sensitivity``, the learning-rate grids).

    ``budget_s`` / ``seeds`` default to :data:`DEFAULT_BUDGET_S` / :data:`DEFAULT_SEEDS`
    (``quick``: :data:`QUICK_BUDGET_S` and one seed); ``grid_budget_s`` to
    :data:`DEFAULT_GRID_BUDGET_S` (``quick``: :data:`QUICK_BUDGET_S`). ``sweep`` also writes
    the best rates to ``rates_path``. Returns the JSON document written (plus ``"files"``).
    Every argument is checked before anything runs.
    """
    from torchdyn_snopt.bench import suite_report as report

    tasks, optimizers = _names(tasks), _names(optimizers)
    if budget_s is None:
        budget_s = QUICK_BUDGET_S if quick else DEFAULT_BUDGET_S
    if seeds is None:
        seeds = 1 if quick else DEFAULT_SEEDS
    if grid_budget_s is None:
        grid_budget_s = QUICK_BUDGET_S if quick else DEFAULT_GRID_BUDGET_S
    check_suite_args(tasks, optimizers, budget_s, seeds)
    if sweep and lr_sensitivity:
        raise ValueError("sweep=True and lr_sensitivity=True is invalid; accepted: at most one")
    grid_mode = sweep or lr_sensitivity
    gridded = TUNED if sweep else SENSITIVITY_OPTIMIZERS
    if grid_mode:
        check_suite_args(tasks, optimizers, grid_budget_s, 1)
        if not set(optimizers) & set(gridded):
            raise ValueError(
                f"optimizers={','.join(optimizers)!r} is invalid with "
                f"{'--sweep' if sweep else '--lr-sensitivity'}; accepted: at least one of "
                + ", ".join(gridded)
            )
    rates = load_rates(rates_path)
    try:
        chosen = {t: {o: rate_of(rates, t, o) for o in optimizers} for t in tasks}
        points = SENSITIVITY_POINTS if lr_sensitivity else None
        grids = {o: lr_grid(rates, o, points) for o in optimizers if o in gridded}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"rates_path={str(rates_path)!r} has no valid rate or grid for {err}; accepted: a "
            "file like the packaged suite_rates.json"
        ) from err
    session = Session.open("cpu", out, quiet)
    log, outdir = session.report, session.out
    settings = {
        "mode": "sweep" if sweep else "lr-sensitivity" if lr_sensitivity else "suite",
        "tasks": list(tasks),
        "optimizers": list(optimizers),
        "budget_s": grid_budget_s if grid_mode else budget_s,
        "seeds": 1 if grid_mode else seeds,
        "n_evals": GRID_EVALS if grid_mode else N_EVALS,
        "quick": quick,
        "stall_fraction": STALL,
        "rates_file": str(rates_path),
        "snopt_default": SNOPT_DEFAULT_NOTE if not snopt_lr_has_default() else "SNOpt(model)",
    }
    doc: dict[str, Any] = {**environment(command), "settings": settings, "tasks": {}}
    doc["started"] = time.perf_counter()
    for tname in tasks:  # a missing dataset fails now, not after an hour of other tasks
        TASKS[tname].load()
    if grid_mode:
        return _grid_mode(tasks, grids, grid_budget_s, sweep, rates, rates_path, session, doc)

    runs: dict[str, list[RunResult]] = {}
    summary: dict[str, list[dict[str, Any]]] = {}
    for tname in tasks:
        task = TASKS[tname]
        data = task.load()
        doc["tasks"][tname] = report.task_info(task, data, chosen[tname])
        log(task.describe())
        trials = [
            suite_trial(task, name, chosen[tname][name][0], seed, budget_s)
            for seed in range(seeds)
            for name in optimizers
        ]
        runs[tname] = session.run(trials, data, line=_line, run=run_trial)
        sources = {o: s for o, (_, s) in chosen[tname].items()}
        summary[tname] = task_rows(task, runs[tname], sources)
        log(report.format_rows(summary[tname]) + "\n")
    doc["summary"] = summary
    doc["overall"] = overall(summary)
    doc["runs"] = [report.run_record(t, r) for t, rs in runs.items() for r in rs]
    doc["elapsed_s"] = time.perf_counter() - doc.pop("started")
    files = report.write_suite(doc, runs, outdir)
    log(report.overall_text(doc["overall"]))
    if "snopt-default" in optimizers:
        log(settings["snopt_default"])
    log.wrote(files)
    return {**doc, "files": files}


def _grid_mode(
    tasks: tuple[str, ...],
    grids: dict[str, list[float]],
    budget_s: float,
    sweep: bool,
    rates: dict[str, Any],
    rates_path: str | Path,
    session: Session,
    doc: dict[str, Any],
) -> dict[str, Any]:
    """``--sweep`` / ``--lr-sensitivity``: seed 0 of every optimizer in ``grids`` over its
    grid (``--sweep``: the tuned ones; ``--lr-sensitivity`` also ``snopt-default``)."""
    from torchdyn_snopt.bench import suite_report as report

    log, outdir = session.report, session.out
    if "snopt-default" in doc["settings"]["optimizers"] and "snopt-default" not in grids:
        log("snopt-default has no rate to tune: left out of the grid")
    runs: list[tuple[str, RunResult]] = []
    for tname in tasks:
        task = TASKS[tname]
        data = task.load()
        doc["tasks"][tname] = report.task_info(task, data, {})
        log(task.describe())
        trials = [
            suite_trial(task, name, lr, 0, budget_s, GRID_EVALS)
            for name, grid in grids.items()
            for lr in grid
        ]
        runs += [(tname, r) for r in session.run(trials, data, line=_line, run=run_trial)]
    rows = grid_rows(runs)
    doc["grid"] = grids
    doc["lr_runs"] = rows
    doc["elapsed_s"] = time.perf_counter() - doc.pop("started")
    doc["sensitivity"] = sensitivity(rows)
    files = report.write_sensitivity(doc, outdir)
    log(report.sensitivity_text(doc["sensitivity"]))
    if sweep:
        new = swept_rates(rates, rows, budget_s)
        with open(rates_path, "w") as fh:
            json.dump(new, fh, indent=1)
            fh.write("\n")
        files.append(Path(rates_path))
        doc["rates"] = new["rates"]
        log("best rates written to " + str(rates_path))
    log.wrote(files)
    return {**doc, "files": files}
