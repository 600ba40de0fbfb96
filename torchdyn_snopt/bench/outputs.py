"""Files a comparison writes: JSON of everything, CSV of every point, PNG of the curves."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torchdyn_snopt.bench.provenance import environment
from torchdyn_snopt.bench.records import Point, RunResult


def write_json(path: Path, doc: Any) -> Path:
    """``doc`` as indented JSON at ``path`` (folders created; non-JSON numbers as floats)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1, default=float)
    return path


def write_outputs(
    runs: list[RunResult],
    rows: list[dict[str, Any]],
    out: Path,
    stem: str,
    title: str,
    right: tuple[str, str] = ("test_acc", "test accuracy"),
    settings: dict[str, Any] | None = None,
    loss_label: str = "training loss (minibatch mean)",
) -> list[Path]:
    """JSON (environment, summary, runs, then ``settings``' keys), CSV (every logged point)
    and a PNG of the curves under ``out``; ``right`` is the :class:`Point` field and label of
    the plot's right panel, ``loss_label`` the label of its training-loss axis."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.csv", out / f"{stem}.png"]
    doc = {"environment": environment(), "summary": rows, "runs": [asdict(r) for r in runs]}
    write_json(paths[0], {**doc, **(settings or {})})
    with open(paths[1], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["optimizer", "lr", "seed", *Point.__dataclass_fields__])
        for r in runs:
            for p in r.points:
                w.writerow([r.optimizer, r.lr, r.seed, *asdict(p).values()])
    plot_curves(runs, paths[2], title, right, loss_label)
    return paths


def plot_curves(
    runs: list[RunResult],
    path: Path,
    title: str,
    right: tuple[str, str] = ("test_acc", "test accuracy"),
    loss_label: str = "training loss (minibatch mean)",
) -> None:
    """Training loss (axis label ``loss_label``) and ``right`` (default test accuracy)
    against training wall-clock (Fig. 1/7 analogue). The loss axis is logarithmic when every
    loss is positive."""
    key, label = right
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors: dict[str, str] = {}
    for r in runs:
        c = colors.setdefault(r.optimizer, f"C{len(colors)}")
        t = [p.seconds for p in r.points]
        legend = f"{r.optimizer} (lr {r.lr:g})" if r.seed == min(x.seed for x in runs) else None
        ax_l.plot(t, [p.train_loss for p in r.points], color=c, label=legend, alpha=0.85)
        ax_a.plot(t, [getattr(p, key) for p in r.points], color=c, label=legend, alpha=0.85)
    if all(p.train_loss > 0 for r in runs for p in r.points):
        ax_l.set_yscale("log")
    ax_l.set_xlabel("training wall-clock (s)")
    ax_l.set_ylabel(loss_label)
    ax_a.set_xlabel("training wall-clock (s)")
    ax_a.set_ylabel(label)
    accs = [p.test_acc for r in runs for p in r.points]
    if key == "test_acc" and accs:
        ax_a.set_ylim(max(0.0, sorted(accs)[len(accs) // 10] - 0.05), 1.0)
    ax_a.legend(loc="lower right" if key == "test_acc" else "upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
