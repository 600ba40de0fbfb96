"""Outputs of ``torchdyn-snopt bench suite``: printed lines, ``suite.md``, ``suite.json``,
``suite.png`` and, for the learning-rate grids, ``lr_sensitivity.{md,json,png}``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torchdyn_snopt.bench.provenance import short_command
from torchdyn_snopt.bench.records import RunResult, fmt, format_table, md_table
from torchdyn_snopt.bench.suite_tasks import TASKS, Data, Task

#: The training loss of each kind of task (plot titles).
LOSS_LABEL = {"accuracy": "cross-entropy", "mse": "MSE", "nll": "NLL (nats)"}
#: The optimizer the targets below are about (SNOpt at its defaults) and its reference.
TARGET, REFERENCE = "snopt-default", "adam"
#: Target: :data:`TARGET`'s seconds per iteration at most this multiple of Adam's, every task.
COST_TARGET = 1.3
#: Target: :data:`TARGET`'s usable range of rates (``high / low``, see
#: :func:`~torchdyn_snopt.bench.suite.usable_range`) at least this wide, every task.
RANGE_TARGET = 30.0


def _ok(good: bool | None) -> str:
    return "-" if good is None else "yes" if good else "NO"


def _evaluations(row: dict[str, Any]) -> float:
    """Field evaluations per iteration of one summary row: forward plus backward solve (NaN
    when the run file has no counts)."""
    total = row.get("nfe_forward", math.nan) + row.get("nfe_backward", math.nan)
    return total if math.isfinite(total) and total > 0 else math.nan


def cost_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task of a ``suite.json``: Adam's and :data:`TARGET`'s seconds per iteration (the
    summary's mean over seeds), their ratio and whether it is <= :data:`COST_TARGET`
    (``yes`` / ``NO``; ``-`` when a time is missing), then the same ratio per field evaluation
    (seconds per iteration over the forward and backward solves' evaluations per iteration,
    counted alike): an adaptive solver takes more steps on a field that training has made
    harder to solve, whatever the optimizer's own cost, and this column separates the two.
    The target is on seconds per iteration. Empty when either optimizer is absent."""
    rows = []
    for task, summary in doc["summary"].items():
        by = {r["optimizer"]: r for r in summary}
        if TARGET not in by or REFERENCE not in by:
            continue
        ref, ours = by[REFERENCE]["s_per_iter"], by[TARGET]["s_per_iter"]
        known = math.isfinite(ref) and math.isfinite(ours) and ref > 0
        x = ours / ref if known else math.nan
        per_eval = x * _evaluations(by[REFERENCE]) / _evaluations(by[TARGET])
        rows.append(
            {
                "task": task,
                f"{REFERENCE} s/iter": ref,
                f"{TARGET} s/iter": ours,
                f"x {REFERENCE}": x,
                f"<= {COST_TARGET:g}x": _ok(x <= COST_TARGET if known else None),
                f"x {REFERENCE} per evaluation": per_eval,
            }
        )
    return rows


def _range_cells(u: dict[str, float] | None, grid: list[float]) -> tuple[str, str, int]:
    """``(interval, ratio, gaps)`` cells of one usable range; ``>=`` marks a range that ends
    at an end of the grid (a wider grid might widen it); ``gaps``: grid rates inside the
    interval that were not usable."""
    if u is None:
        return "not run", "-", 0
    if not u["count"]:
        return "none", "-", 0
    lo, hi = u["low"], u["high"]
    censored = bool(grid) and (lo <= min(grid) or hi >= max(grid))
    inside = sum(1 for lr in grid if lo <= lr <= hi)
    ratio = ("≥" if censored else "") + f"{fmt(u['ratio'])}×"
    return f"{fmt(lo)} – {fmt(hi)}", ratio, max(0, inside - int(u["count"]))


def range_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task of an ``lr_sensitivity.json``: the usable rates (interval and ``high / low``)
    of :data:`TARGET` and Adam side by side, and whether :data:`TARGET`'s range is at least
    :data:`RANGE_TARGET` wide with no unusable rate inside it (``yes`` / ``NO``). Empty when
    the run has no :data:`TARGET` grid."""
    sens = doc.get("sensitivity", {})
    if not any(TARGET in per for per in sens.values()):
        return []
    grids = doc.get("grid", {})
    rows = []
    for task, per in sens.items():
        row: dict[str, Any] = {"task": task}
        good = None
        for name in (TARGET, REFERENCE):
            interval, ratio, gaps = _range_cells(per.get(name), grids.get(name, []))
            row[f"{name} usable lr"] = interval + (f" ({gaps} unusable inside)" if gaps else "")
            row[f"{name} high/low"] = ratio
            if name == TARGET and per.get(name) is not None:
                good = per[name]["count"] > 0 and per[name]["ratio"] >= RANGE_TARGET and not gaps
        row[f"{TARGET} >= {RANGE_TARGET:g}x"] = _ok(good)
        rows.append(row)
    return rows


def target_sections(suite: dict[str, Any] | None, sens: dict[str, Any] | None) -> list[str]:
    """Markdown sections of :func:`cost_rows` (from a ``suite.json``) and :func:`range_rows`
    (from an ``lr_sensitivity.json``); a section without rows is left out."""
    lines: list[str] = []
    cost = cost_rows(suite) if suite is not None else []
    if cost:
        lines += [
            "",
            f"## Cost per iteration: {TARGET} against {REFERENCE}",
            "",
            f"Seconds per training iteration (mean over seeds, the runs of the per-task tables) "
            f"and their ratio; target: at most {COST_TARGET:g}x {REFERENCE}'s on every task. "
            "The last column divides each time by the field evaluations per iteration (forward "
            "and backward solves, the NFE columns above, counted alike although a backward "
            "evaluation costs more) first: an adaptive solver takes more "
            "steps on a field that training has made harder to solve, and this ratio compares "
            "what one evaluation costs, the optimizer's own work per iteration spread over "
            "them.",
            "",
            *md_table(cost),
        ]
    ranges = range_rows(sens) if sens is not None else []
    if sens is not None and ranges:
        s = sens["settings"]
        lines += [
            "",
            f"## Usable learning rates: {TARGET} and {REFERENCE}",
            "",
            f"From `{short_command(sens['command'])}` ({s['budget_s']:g} s per "
            "run, seed 0): the rates whose final training loss is within 2x of the grid's best "
            "and whose run neither diverged nor stalled; `≥`: the range reaches an end of the "
            f"grid. Target: {TARGET}'s range at least {RANGE_TARGET:g}x wide on every task.",
            "",
            *md_table(ranges),
        ]
    return lines


def target_summary(suite: dict[str, Any], sens: dict[str, Any] | None) -> list[str]:
    """Short lines for the README: the spread of :data:`TARGET`'s s/iter ratios and of the
    usable ranges, naming the tasks that miss a target."""
    lines = []
    cost = [r for r in cost_rows(suite) if math.isfinite(r[f"x {REFERENCE}"])]
    if cost:
        xs = [r[f"x {REFERENCE}"] for r in cost]
        high = [r for r in cost if r[f"x {REFERENCE}"] > COST_TARGET]
        over = [f"{r['task']} {fmt(r[f'x {REFERENCE}'])}×" for r in high]
        per_eval = [f"{r['task']} {fmt(r[f'x {REFERENCE} per evaluation'])}×" for r in high
                    if math.isfinite(r[f"x {REFERENCE} per evaluation"])]  # fmt: skip
        lines.append(
            f"{TARGET}'s seconds per iteration: {fmt(min(xs))}× to {fmt(max(xs))}× "
            f"{REFERENCE}'s over {len(cost)} tasks (target ≤ {COST_TARGET:g}×; "
            + (f"above it on {', '.join(over)})." if over else "met on every task).")
            + (
                f" Per field evaluation (the solves' NFE divided out): {', '.join(per_eval)}."
                if per_eval
                else ""
            )
        )
    ranges = range_rows(sens) if sens is not None else []
    if sens is not None and ranges:
        short = [r["task"] for r in ranges if r[f"{TARGET} >= {RANGE_TARGET:g}x"] != "yes"]
        per_task = sens["sensitivity"].values()
        spans = {
            name: [u[name]["ratio"] for u in per_task if name in u and u[name]["count"]]
            for name in (TARGET, REFERENCE)
        }
        parts = [f"{name} {fmt(min(v))}× to {fmt(max(v))}×" for name, v in spans.items() if v]
        lines.append(
            "Usable learning-rate range (high/low, final loss within 2× of the best, no "
            f"failure): {'; '.join(parts)} (target for {TARGET} ≥ {RANGE_TARGET:g}×; "
            + (f"missed on {', '.join(short)})." if short else "met on every task).")
        )
    return lines


def task_info(task: Task, data: Data, rates: dict[str, tuple[float, str]]) -> dict[str, Any]:
    """The task's fixed settings, split sizes and the rate (and its source) per optimizer."""
    return {
        "description": task.describe(),
        "metric": task.metric,
        "batch_size": task.batch_size,
        "solver": task.solver,
        "tol": task.tol,
        "snopt_options": task.snopt_options,
        "n_train": len(data[0]),
        "n_test": len(data[2]),
        "train_eval_rows": min(task.train_eval_size or len(data[0]), len(data[0])),
        "max_nfe": task.max_nfe,
        "rates": {o: {"lr": lr, "source": src} for o, (lr, src) in rates.items()},
    }


def run_line(seed: int, r: RunResult) -> str:
    """One printed line per run."""
    flags = "".join(f" [{k}]" for k in ("diverged", "stalled") if r.extra.get(k))
    first = r.points[0].train_loss if r.points else math.nan
    last = r.points[-1].train_loss if r.points else math.nan
    return (
        f"seed {seed} {r.optimizer:13s} lr={r.lr:<8g} train loss {first:.4g} -> {last:.4g}, "
        f"{r.iterations} iterations, {r.seconds_per_iter * 1e3:.0f} ms/iter, "
        f"{r.extra.get('wall_s', math.nan):.1f} s in all{flags}"
        + (f" ({r.error[:80]})" if r.error else "")
    )


def run_record(task: str, r: RunResult) -> dict[str, Any]:
    """A run for the JSON: its task and every field of the :class:`RunResult`."""
    return {"task": task, **asdict(r)}


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Aligned plain-text table of one task's rows."""
    return format_table(rows)


def _fmt_load(load: list[float] | None) -> str:
    return "unknown" if not load else " / ".join(f"{v:.2f}" for v in load)


def overall_text(o: dict[str, Any]) -> str:
    """The overall table as plain text: per task the winner, per optimizer median and wins."""
    per_task = format_table([{"task": t, "winner": w or "-"} for t, w in o["winners"].items()])
    per_opt = format_table(
        [
            {"optimizer": n, "median_x_adam_time": o["median_x_adam_time"][n], "wins": o["wins"][n]}
            for n in o["wins"]
        ]
    )
    return "time to tuned Adam's final training loss\n" + per_task + "\n\n" + per_opt


def write_suite(doc: dict[str, Any], runs: dict[str, list[RunResult]], out: Path) -> list[Path]:
    """``suite.json`` (everything), ``suite.md`` and ``suite.png`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "suite.md", out / "suite.json", out / "suite.png"]
    with open(paths[1], "w") as fh:
        json.dump(doc, fh, indent=1, default=float)
    paths[0].write_text(suite_markdown(doc, paths[2].name))
    s = doc["settings"]
    plot_suite(runs, paths[2], f"{s['budget_s']:g} s per run, {s['seeds']} seed(s)")
    return paths


def suite_markdown(
    doc: dict[str, Any],
    png: str = "suite.png",
    title: str = "# torchdyn-snopt bench suite",
    sensitivity: dict[str, Any] | None = None,
) -> str:
    """The markdown page of a ``suite.json`` document (also used by ``torchdyn-snopt report``,
    which passes an ``lr_sensitivity.json`` as ``sensitivity`` when it has one): the tables,
    then :func:`target_sections`."""
    s = doc["settings"]
    lines = [
        title,
        "",
        f"`{short_command(doc['command'])}` on {doc['date']}, "
        f"{doc['elapsed_s'] / 60:.1f} min in all",
        "",
        f"- machine: {doc['machine']['cpu']}, {doc['machine']['cpu_count']} CPUs, "
        f"{doc['machine']['torch_threads']} torch threads; {doc['machine']['platform']}; "
        f"load average at the start {_fmt_load(doc['machine']['load_average_at_start'])} "
        "(wall-clock comparisons need an otherwise idle machine)",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
        f"- {s['budget_s']:g} s of training per run (evaluations pause the clock), "
        f"{s['seeds']} seed(s); same initial weights and minibatch stream for every optimizer",
        "- time to Adam's loss: per seed, the first logged time whose training loss is <= "
        "tuned Adam's final training loss of that seed, and its ratio to Adam's own first "
        "time (median over seeds; inf = never); the training loss is logged at 0 s and every "
        f"1/{s['n_evals']} of the budget, so a time is resolved to that step",
        f"- a run is *diverged* when it raised or its loss went non-finite, *stalled* when its "
        f"final training loss is not below {s['stall_fraction']:g}x the initial one (or its ODE "
        "grew too stiff)",
        "- NFE: field evaluations per iteration of the forward and the backward (adjoint) "
        "solves, counted by `tds.read_nfe` (every task runs the snopt adjoint; Adam, SGD and "
        "SOAP never arm its curvature sampling)",
        "- lr_source: `sweep` = best rate of `bench suite --sweep` on this task; `prior` = "
        "taken from the other benches or the implementation notes, not swept on this task; "
        "`reference` / `default` = snopt-default's (not tuned)",
        f"- {s['snopt_default']}",
        "",
        "## Overall",
        "",
        *md_table([{"task": t, "winner": w or "-"} for t, w in doc["overall"]["winners"].items()]),
        "",
        *md_table(overall_rows(doc)),
        *target_sections(doc, sensitivity),
    ]
    for tname, rows in doc["summary"].items():
        info = doc["tasks"][tname]
        lines += ["", f"## {tname}", "", info["description"], "", *md_table(rows)]
    lines += ["", f"![training loss against wall-clock]({png})", ""]
    return "\n".join(lines)


def overall_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per optimizer: median time to Adam's final loss (× Adam's) across tasks and wins."""
    o = doc["overall"]
    return [
        {"optimizer": n, "median_x_adam_time": o["median_x_adam_time"][n], "wins": o["wins"][n]}
        for n in o["wins"]
    ]


def _panels(n: int) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def plot_suite(runs: dict[str, list[RunResult]], path: Path, title: str) -> None:
    """One panel per task: training loss against training wall-clock, the median over seeds
    of each logged point (by its index) with a min-max band; log y where every loss is > 0."""
    fig, axes = _panels(len(runs))
    for ax, (tname, rs) in zip(axes, runs.items()):
        for i, name in enumerate(dict.fromkeys(r.optimizer for r in rs)):
            mine = [r for r in rs if r.optimizer == name and r.points]
            n = max((len(r.points) for r in mine), default=0)
            t, mid, lo, hi = [], [], [], []
            for k in range(n):
                pts = [r.points[k] for r in mine if len(r.points) > k]
                losses = sorted(p.train_loss for p in pts)
                t.append(sorted(p.seconds for p in pts)[len(pts) // 2])
                mid.append(losses[len(losses) // 2])
                lo.append(losses[0])
                hi.append(losses[-1])
            ax.plot(t, mid, color=f"C{i}", label=f"{name} ({mine[0].lr:g})" if mine else name)
            if len(mine) > 1:
                ax.fill_between(t, lo, hi, color=f"C{i}", alpha=0.2)
        losses = [p.train_loss for r in rs for p in r.points]
        if losses and all(v > 0 for v in losses if math.isfinite(v)):
            ax.set_yscale("log")
        ax.set_title(f"{tname}: {LOSS_LABEL[TASKS[tname].metric]}" if tname in TASKS else tname)
        ax.set_xlabel("training wall-clock (s)")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    fig.suptitle(f"bench suite: training loss (median over seeds, min-max band); {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)


def sensitivity_text(sens: dict[str, dict[str, dict[str, float]]]) -> str:
    """Per optimizer: the usable range on each task and the median max/min ratio."""
    lines = [
        "usable learning rates (final training loss within 2x of the grid's best; the run "
        "neither diverged nor stalled)"
    ]
    names = list(dict.fromkeys(n for per in sens.values() for n in per))
    for name in names:
        ratios = [per[name]["ratio"] for per in sens.values() if name in per]
        kept = sorted(r for r in ratios if not math.isnan(r))
        med = kept[len(kept) // 2] if kept else math.nan
        lines.append(f"{name}: median max/min {fmt(med)}")
        for task, per in sens.items():
            u = per.get(name)
            if u is not None:
                lines.append(
                    f"  {task:10s} {fmt(u['low'])} .. {fmt(u['high'])} (x{fmt(u['ratio'])}, "
                    f"{u['count']} rates), best {fmt(u['best_lr'])}"
                )
    return "\n".join(lines)


def sensitivity_markdown(doc: dict[str, Any], png: str = "lr_sensitivity.png") -> str:
    """The markdown page of an ``lr_sensitivity.json`` (``--sweep`` / ``--lr-sensitivity``)."""
    s = doc["settings"]
    rows = [
        {"task": t, "optimizer": n, **u}
        for t, per in doc["sensitivity"].items()
        for n, u in per.items()
    ]
    lines = [
        f"# torchdyn-snopt bench suite --{s['mode']}",
        "",
        f"`{short_command(doc['command'])}` on {doc['date']}; {s['budget_s']:g} s per run, seed 0; "
        f"{doc['machine']['cpu']}",
        "",
        "```",
        sensitivity_text(doc["sensitivity"]),
        "```",
        "",
        *md_table(rows),
        *target_sections(None, doc),
        "",
        f"![final training loss per learning rate]({png})",
        "",
    ]
    return "\n".join(lines)


def write_sensitivity(doc: dict[str, Any], out: Path) -> list[Path]:
    """``lr_sensitivity.json``, ``.md`` and ``.png`` (final training loss per rate, one panel
    per task, failed runs marked x)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "lr_sensitivity.md", out / "lr_sensitivity.json", out / "lr_sensitivity.png"]
    with open(paths[1], "w") as fh:
        json.dump(doc, fh, indent=1, default=float)
    s = doc["settings"]
    paths[0].write_text(sensitivity_markdown(doc, paths[2].name))
    fig, axes = _panels(len(doc["sensitivity"]))
    for ax, task in zip(axes, doc["sensitivity"]):
        mine = [r for r in doc["lr_runs"] if r["task"] == task]
        for i, name in enumerate(dict.fromkeys(r["optimizer"] for r in mine)):
            pts = [r for r in mine if r["optimizer"] == name]
            good = [r for r in pts if not r["diverged"] and math.isfinite(r["final_train_loss"])]
            ax.plot(
                [r["lr"] for r in good],
                [r["final_train_loss"] for r in good],
                marker="o",
                color=f"C{i}",
                label=name,
            )
            bad = [r["lr"] for r in pts if r not in good]
            if bad and good:
                top = max(r["final_train_loss"] for r in good)
                ax.scatter(bad, [top] * len(bad), marker="x", color=f"C{i}")
        losses = [r["final_train_loss"] for r in mine if math.isfinite(r["final_train_loss"])]
        if losses and all(v > 0 for v in losses):
            ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final training loss")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"final training loss against learning rate ({s['budget_s']:g} s, seed 0; x: failed)"
    )
    fig.tight_layout()
    fig.savefig(paths[2], dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths
