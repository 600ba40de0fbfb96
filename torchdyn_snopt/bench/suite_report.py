"""Outputs of ``torchdyn-snopt bench suite``: printed lines, ``suite.md``, ``suite.json``,
``suite.png`` and, for the learning-rate grids, ``lr_sensitivity.{md,json,png}``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torchdyn_snopt.bench.records import RunResult, fmt, format_table
from torchdyn_snopt.bench.suite_tasks import TASKS, Data, Task

#: The training loss of each kind of task (plot titles).
LOSS_LABEL = {"accuracy": "cross-entropy", "mse": "MSE", "nll": "NLL (nats)"}


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


def _md_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in cols) + " |" for row in rows]
    return lines


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
    doc: dict[str, Any], png: str = "suite.png", title: str = "# torchdyn-snopt bench suite"
) -> str:
    """The markdown page of a ``suite.json`` document (also used by ``torchdyn-snopt report``)."""
    s = doc["settings"]
    lines = [
        title,
        "",
        f"`{doc['command']}` on {doc['date']}, {doc['elapsed_s'] / 60:.1f} min in all",
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
        "time (median over seeds; inf = never)",
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
        *_md_table([{"task": t, "winner": w or "-"} for t, w in doc["overall"]["winners"].items()]),
        "",
        *_md_table(overall_rows(doc)),
    ]
    for tname, rows in doc["summary"].items():
        info = doc["tasks"][tname]
        lines += ["", f"## {tname}", "", info["description"], "", *_md_table(rows)]
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
        f"`{doc['command']}` on {doc['date']}; {s['budget_s']:g} s per run, seed 0; "
        f"{doc['machine']['cpu']}",
        "",
        "```",
        sensitivity_text(doc["sensitivity"]),
        "```",
        "",
        *_md_table(rows),
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
