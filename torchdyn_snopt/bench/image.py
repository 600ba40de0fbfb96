"""``torchdyn-snopt bench image``: Adam, SGD and SNOpt at equal wall-clock (Fig. 1/7, Table 4).

The paper's image model (conv features → conv Neural ODE, dopri5 at 1e-3 on ``[0, 1]`` →
linear head) trained by every optimizer from the same initial weights with the same minibatch
stream for the same training wall-clock. All optimizers use the same backward solver (the
snopt adjoint; Adam and SGD never arm its curvature sampling), so the comparison measures the
optimizers; ``--baseline-sensitivity adjoint`` gives Adam/SGD torchdyn's own adjoint instead.
``--sweep`` runs each optimizer over a learning-rate grid (and ``eps`` for SNOpt): Fig. 9.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchdyn_snopt.bench.common import (
    OPTIMIZERS,
    RunResult,
    check_run_args,
    format_table,
    make_optimizer,
    peak_memory_mb,
    run_grid,
    summary_rows,
    train_for,
    with_bar,
    write_outputs,
)

#: Learning rates per dataset: the best final test accuracy of ``bench image --sweep
#: --budget-s 30`` on each (SGD at 0.1 diverged on MNIST and Fashion-MNIST). On
#: Fashion-MNIST SGD's pick, 3e-2, stalled on seeds 1 and 2, so its default is the second
#: choice, 1e-2, which trains on all three.
DEFAULT_LRS: dict[str, dict[str, float]] = {
    "digits": {"adam": 1e-2, "sgd": 1e-2, "snopt": 1e-3},
    "mnist": {"adam": 3e-3, "sgd": 1e-2, "snopt": 3e-3},
    "fashion-mnist": {"adam": 3e-3, "sgd": 1e-2, "snopt": 3e-3},
}
SWEEP_LRS: dict[str, tuple[float, ...]] = {
    "adam": (1e-3, 3e-3, 1e-2),
    "sgd": (0.01, 0.03, 0.1),
    "snopt": (1e-3, 3e-3, 1e-2),
}
SWEEP_EPS: tuple[float, ...] = (0.01, 0.05, 0.2)
SNOPT_OPTIONS: dict[str, Any] = {"update_freq": 10, "full_precond": True}
#: A run whose forward solve needs more evaluations than this in one iteration (dopri5 at
#: 1e-3 takes 14-30 here) has made the ODE too stiff to train (SGD at 3e-2 on Fashion-MNIST,
#: seeds 1 and 2; before this guard, SGD at 3e-2 on MNIST ran 10 s of training in 8 min): it is
#: stopped and marked ``stalled`` instead of crawling on for hours of evaluations.
MAX_NFE = 400
#: Model shape per dataset: feature channels and stride-2 downsamplings before the ODE.
MODEL_OPTIONS: dict[str, dict[str, int]] = {
    "digits": {"channels": 12, "downsample": 0},
    "mnist": {"channels": 16, "downsample": 2},
    "fashion-mnist": {"channels": 16, "downsample": 2},
}


def build_model(
    dataset: str,
    x_shape: tuple[int, ...],
    sensitivity: str,
    num_classes: int = 10,
    **overrides: Any,
) -> nn.Module:
    """The dataset's :class:`ImageClassifier`; ``overrides`` replace its keyword arguments."""
    from torchdyn_snopt.models import ImageClassifier

    opts = {**MODEL_OPTIONS[dataset], **overrides}
    return ImageClassifier(
        in_channels=x_shape[1],
        image_size=x_shape[-1],
        num_classes=num_classes,
        sensitivity=sensitivity,
        **opts,
    )


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    eps: float | None = None,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The bench's optimizer ``name`` (:func:`make_optimizer` with :data:`SNOPT_OPTIONS`;
    ``eps`` overrides SNOpt's damping)."""
    kw = dict(SNOPT_OPTIONS) if eps is None else {**SNOPT_OPTIONS, "eps": eps}
    return make_optimizer(name, model, lr, kw, weight_decay)


def _regularizer(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Table 6: kinetic + Jacobian-norm regularizer and NFE of the trained ODE."""
    try:
        from torchdyn_snopt.regularization import kinetic_jacobian
    except ImportError:  # pragma: no cover - module ships with the package
        return {}
    with torch.no_grad():
        z = model.features(x)
    r = kinetic_jacobian(model.ode, z, model.t_span, generator=torch.Generator().manual_seed(0))
    return {
        "reg_kinetic": r["kinetic"],
        "reg_jacobian": r["jacobian"],
        "reg_total": r["total"],
        "nfe_eval": r["nfe_forward"],
    }


def run_one(
    name: str,
    lr: float,
    seed: int,
    dataset: str,
    data: tuple,
    budget_s: float,
    device: torch.device,
    batch_size: int,
    baseline_sensitivity: str,
    eps: float | None = None,
    progress: Callable[[float], None] | None = None,
    measure: bool = True,
) -> RunResult:
    """Train one optimizer on ``data`` (already on ``device``) for ``budget_s`` seconds.

    A run whose ODE solve fails (the adaptive step size underflowed) is returned without
    points and with ``extra["diverged"] = 1``; one whose forward solve needs more than
    :data:`MAX_NFE` evaluations is stopped with ``extra["stalled"] = 1``.
    """
    sens = "snopt" if name == "snopt" else baseline_sensitivity
    torch.manual_seed(seed)
    model = build_model(dataset, tuple(data[0].shape), sens).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full_precond covers all; nothing useful to say
        opt = build_optimizer(name, model, lr, eps)
    result = train_for(
        model,
        opt,
        data,
        budget_s,
        name=name,
        lr=lr,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        max_nfe=MAX_NFE,
        catch_failures=True,
    )
    measure = measure and not result.extra.get("diverged")
    if eps is not None:
        result.extra["eps"] = eps
    if measure:
        result.extra.update(_regularizer(model, data[2][:256]))
        xb, yb = data[0][:batch_size], data[1][:batch_size]

        def step() -> None:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()

        result.peak_memory_mb = peak_memory_mb(step, model, device)
    return result


def bench_image(
    dataset: str = "digits",
    budget_s: float = 60.0,
    seeds: int = 1,
    optimizers: tuple[str, ...] = OPTIMIZERS,
    lrs: dict[str, float] | None = None,
    device: str = "auto",
    out: str | Path = "runs/image",
    quiet: bool = False,
    batch_size: int = 128,
    baseline_sensitivity: str = "snopt",
    sweep: bool = False,
) -> dict[str, Any]:
    """Run the image benchmark; returns ``{"summary": rows, "runs": [...], "files": [...]}``."""
    from torchdyn_snopt.data import IMAGE_DATASETS, load_image_dataset

    if dataset not in IMAGE_DATASETS:
        raise ValueError(f"dataset={dataset!r} is unknown; accepted: {', '.join(IMAGE_DATASETS)}")
    check_run_args(tuple(optimizers), OPTIMIZERS, budget_s, seeds)
    if baseline_sensitivity not in ("snopt", "adjoint"):
        raise ValueError(
            f"baseline_sensitivity={baseline_sensitivity!r} is invalid; "
            "accepted: 'snopt', 'adjoint'"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    chosen = {**DEFAULT_LRS[dataset], **(lrs or {})}
    log = (lambda *a: None) if quiet else print
    data = tuple(t.to(dev) for t in load_image_dataset(dataset))
    log(
        f"{dataset}: {len(data[0])} train / {len(data[2])} test images, batch {batch_size}, "
        f"{budget_s:g} s of training per run, device {dev}"
    )

    common = {
        "dataset": dataset,
        "data": data,
        "budget_s": budget_s,
        "device": dev,
        "batch_size": batch_size,
        "baseline_sensitivity": baseline_sensitivity,
    }
    runs: list[RunResult] = []
    if sweep:
        grid = [(o, lr, {"eps": None}) for o in optimizers for lr in SWEEP_LRS[o]]
        if "snopt" in optimizers:
            grid += [("snopt", chosen["snopt"], {"eps": e}) for e in SWEEP_EPS]
        runs = run_grid(grid, lambda *a, **k: run_one(*a, **k, **common), budget_s, quiet, log)
        rows = sweep_rows(runs)
        files = write_sweep(runs, rows, Path(out), dataset)
    else:
        for seed in range(seeds):
            for name in optimizers:
                desc = f"seed {seed} {name} lr={chosen[name]:g}"
                r = with_bar(
                    desc,
                    budget_s,
                    quiet,
                    lambda p, n=name, s=seed: run_one(n, chosen[n], s, progress=p, **common),
                )
                runs.append(r)
                log(
                    f"  seed {seed} {name:5s} lr={r.lr:g}: final acc {r.final_acc:.4f}, "
                    f"best {r.best_acc:.4f}, {r.iterations} iterations"
                )
        rows = summary_rows(runs)
        files = write_outputs(
            runs,
            rows,
            Path(out),
            f"image_{dataset}",
            f"{dataset}: {budget_s:g} s per run, {seeds} seed(s)",
        )
    log("")
    log(format_table(rows))
    log(
        "learning rates: "
        + ", ".join(f"{o}={chosen[o]:g}" for o in optimizers)
        + ("" if sweep else f"; SNOpt options {SNOPT_OPTIONS}")
    )
    log("wrote " + ", ".join(str(p) for p in files))
    return {"summary": rows, "runs": runs, "files": files}


def sweep_rows(runs: list[RunResult]) -> list[dict[str, Any]]:
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


def write_sweep(
    runs: list[RunResult], rows: list[dict[str, Any]], out: Path, dataset: str
) -> list[Path]:
    """JSON of the sweep and the Fig. 9 analogue: final accuracy per learning rate."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"sweep_{dataset}.json", out / f"sweep_{dataset}.png"]
    with open(paths[0], "w") as fh:
        json.dump(rows, fh, indent=1, default=float)
    fig, (ax_a, ax_l) = plt.subplots(1, 2, figsize=(10, 3.8))
    markers = {"adam": "o", "sgd": "s", "snopt": "^"}
    for i, name in enumerate(dict.fromkeys(r.optimizer for r in runs)):
        rs = [r for r in runs if r.optimizer == name and "eps" not in r.extra]
        kw = {"marker": markers.get(name, "x"), "color": f"C{i}", "label": name}
        ax_a.plot([r.lr for r in rs], [r.final_acc for r in rs], **kw)
        ax_l.plot([r.lr for r in rs], [r.final_train_loss for r in rs], **kw)
        eps_runs = [r for r in runs if r.optimizer == name and "eps" in r.extra]
        if eps_runs:
            ax_a.scatter(
                [r.lr for r in eps_runs],
                [r.final_acc for r in eps_runs],
                marker="*",
                color=f"C{i}",
                label=f"{name}, eps grid",
            )
    for ax, lab in ((ax_a, "final test accuracy"), (ax_l, "final training loss")):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(lab)
    ax_l.set_yscale("log")
    ax_a.legend(loc="lower left")
    fig.suptitle(f"{dataset}: sensitivity to the learning rate (Fig. 9 analogue)")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
