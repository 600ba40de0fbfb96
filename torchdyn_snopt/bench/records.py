"""What a run records (:class:`Point`, :class:`RunResult`) and its summary tables."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

#: Per-run flags in ``RunResult.extra`` (1 = happened); their summary is the fraction of seeds.
FLAGS: tuple[str, ...] = ("stalled", "diverged")


@dataclass
class Point:
    """One logged evaluation: training seconds so far, iterations, losses, accuracy.

    ``train_loss`` is what the bench logs as its training loss (see
    :mod:`torchdyn_snopt.bench.trial`); ``window_loss`` is always the mean minibatch loss of
    the iterations since the previous evaluation (NaN at a point before any iteration).
    """

    seconds: float
    iteration: int
    train_loss: float
    test_loss: float
    test_acc: float
    window_loss: float = math.nan


@dataclass
class RunResult:
    """Everything one (optimizer, lr, seed) run produced (``error``: the message of the
    exception that ended a failed run, else empty)."""

    optimizer: str
    lr: float
    seed: int
    points: list[Point] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    nfe_forward: float = float("nan")
    nfe_backward: float = float("nan")
    peak_memory_mb: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def final_acc(self) -> float:
        return self.points[-1].test_acc if self.points else float("nan")

    @property
    def best_acc(self) -> float:
        return max((p.test_acc for p in self.points), default=float("nan"))

    @property
    def final_train_loss(self) -> float:
        return self.points[-1].train_loss if self.points else float("nan")

    @property
    def final_test_loss(self) -> float:
        return self.points[-1].test_loss if self.points else float("nan")

    @property
    def seconds_per_iter(self) -> float:
        return self.seconds / max(self.iterations, 1)

    def time_to(self, acc: float) -> float:
        """Training seconds at the first evaluation with test accuracy ``>= acc`` (inf: never)."""
        return next((p.seconds for p in self.points if p.test_acc >= acc), math.inf)


def mean(values: list[float]) -> float:
    """Arithmetic mean; NaN for no values."""
    return sum(values) / len(values) if values else float("nan")


def by_optimizer(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """``runs`` grouped by optimizer, in order of first appearance."""
    groups: dict[str, list[RunResult]] = {}
    for r in runs:
        groups.setdefault(r.optimizer, []).append(r)
    return groups


def summary_rows(
    runs: list[RunResult],
    references: tuple[str, ...] = ("adam", "sgd"),
) -> list[dict[str, Any]]:
    """Mean over seeds per optimizer.

    For each reference optimizer present (Adam, SGD), ``s_to_<ref>_best`` is the mean training
    time until a run first reaches that seed's best test accuracy of the reference (``inf``
    if some seed never does) and ``x_<ref>_time`` its ratio to the reference's own time.
    """
    groups = by_optimizer(runs)
    rows = []
    for name, rs in groups.items():
        row: dict[str, Any] = {
            "optimizer": name,
            "lr": rs[0].lr,
            "seeds": len(rs),
            "final_acc": mean([r.final_acc for r in rs]),
            "best_acc": mean([r.best_acc for r in rs]),
            "final_train_loss": mean([r.final_train_loss for r in rs]),
        }
        for ref in (r for r in references if r in groups):
            best = {r.seed: r.best_acc for r in groups[ref]}
            own = mean([r.time_to(r.best_acc) for r in groups[ref]])
            times = mean([r.time_to(best[r.seed]) for r in rs if r.seed in best])
            row[f"s_to_{ref}_best"] = times
            row[f"x_{ref}_time"] = times / own if own else math.nan
        row.update(
            {
                "s_per_iter": mean([r.seconds_per_iter for r in rs]),
                "iterations": mean([float(r.iterations) for r in rs]),
                "nfe_forward": mean([r.nfe_forward for r in rs]),
                "nfe_backward": mean([r.nfe_backward for r in rs]),
                "peak_memory_mb": mean([r.peak_memory_mb for r in rs]),
                **{
                    k: mean([r.extra.get(k, 0.0 if k in FLAGS else math.nan) for r in rs])
                    for k in dict.fromkeys(k for r in rs for k in r.extra)
                },
            }
        )
        rows.append(row)
    return rows


def grid_rows(runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per run of a learning-rate (or damping) grid: rate, eps, accuracy, flags."""
    return [
        {
            "optimizer": r.optimizer,
            "lr": r.lr,
            "eps": r.extra.get("eps", math.nan),
            "final_acc": r.final_acc,
            "best_acc": r.best_acc,
            "final_train_loss": r.final_train_loss,
            "iterations": r.iterations,
            "stalled": int(r.extra.get("stalled", 0)),
            "diverged": int(r.extra.get("diverged", 0)),
        }
        for r in runs
    ]


def fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits (whole numbers from 10,000 to below 10
    million, e.g. ``12345``; beyond, exponent notation, e.g. a diverged loss ``8.884e+29``),
    NaN as ``-``, inf as ``never``."""
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "never"
        return f"{v:.0f}" if 1e4 <= abs(v) < 1e7 else f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned plain-text table of rows with the same keys (the first row's are the columns)."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def md_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines of ``rows`` (columns: every key in first-seen order; a row without
    a column gets an empty cell)."""
    if not rows:
        return []
    cols = list(dict.fromkeys(c for row in rows for c in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |" for row in rows]
    return lines
