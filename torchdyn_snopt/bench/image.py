"""``torchdyn-snopt bench image``: Adam, SGD and SNOpt at equal wall-clock (Fig. 1/7, Table 4).

The paper's image model (conv features → conv Neural ODE, dopri5 at 1e-3 on ``[0, 1]`` →
linear head) trained by every optimizer from the same initial weights with the same minibatch
stream for the same training wall-clock. All optimizers use the same backward solver (the
snopt adjoint; Adam and SGD never arm its curvature sampling), so the comparison measures the
optimizers; ``--baseline-sensitivity adjoint`` gives Adam/SGD torchdyn's own adjoint instead.
``--sweep`` runs each optimizer over a learning-rate grid (and ``eps`` for SNOpt): Fig. 9.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from torchdyn_snopt.bench.optimizers import OPTIMIZERS, SNOPT_LR, make_optimizer
from torchdyn_snopt.bench.outputs import write_json, write_outputs
from torchdyn_snopt.bench.records import RunResult, grid_rows, summary_rows
from torchdyn_snopt.bench.session import Session, check_choice, check_run_args
from torchdyn_snopt.bench.task import Task
from torchdyn_snopt.bench.trial import Trial

#: Learning rates per dataset: the best final test accuracy of ``bench image --sweep
#: --budget-s 30`` on each (SGD at 0.1 diverged on MNIST and Fashion-MNIST). On
#: Fashion-MNIST SGD's pick, 3e-2, stalled on seeds 1 and 2, so its default is the second
#: choice, 1e-2, which trains on all three.
DEFAULT_LRS: dict[str, dict[str, float]] = {
    "digits": {"adam": 1e-2, "sgd": 1e-2, "snopt": SNOPT_LR},
    "mnist": {"adam": 3e-3, "sgd": 1e-2, "snopt": SNOPT_LR},
    "fashion-mnist": {"adam": 3e-3, "sgd": 1e-2, "snopt": SNOPT_LR},
}
SWEEP_LRS: dict[str, tuple[float, ...]] = {
    "adam": (1e-3, 3e-3, 1e-2),
    "sgd": (0.01, 0.03, 0.1),
    "snopt": (1e-2, 2e-2, 5e-2),  # around SNOpt's default rate (Adam-grafted step)
}
SWEEP_EPS: tuple[float, ...] = (0.03, 0.1, 0.3)  # relative damping, around the default 0.1
#: SNOpt runs at its defaults (relative damping, Adam-grafted step, a refresh every 10 steps,
#: every adaptable layer): no option and, in the rates above, its default ``lr``. The rates
#: tuned before the defaults existed were for the paper's rule (``SNOpt.paper``).
SNOPT_OPTIONS: dict[str, Any] = {}
#: A run whose forward solve needs more evaluations than this in one iteration (dopri5 at
#: 1e-3 takes 14-30 here) has made the ODE too stiff to train (SGD at 3e-2 on Fashion-MNIST,
#: seeds 1 and 2; before this guard, SGD at 3e-2 on MNIST ran 10 s of training in 8 min): it is
#: stopped and marked ``stalled`` instead of crawling on for hours of evaluations.
MAX_NFE = 400
#: The training rows on which the logged training loss is evaluated (untimed) at every point:
#: all of digits' and MNIST's, the first 4,000 (in file order) of Fashion-MNIST's 60,000.
TRAIN_EVAL_ROWS = 4000
#: Model shape per dataset: feature channels and stride-2 downsamplings before the ODE.
MODEL_OPTIONS: dict[str, dict[str, int]] = {
    "digits": {"channels": 12, "downsample": 0},
    "mnist": {"channels": 16, "downsample": 2},
    "fashion-mnist": {"channels": 16, "downsample": 2},
}


BASELINE_SENSITIVITIES: tuple[str, ...] = ("snopt", "adjoint")


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


def task(dataset: str, batch_size: int = 128, **model_overrides: Any) -> Task:
    """The bench's task on ``dataset``: the conv Neural-ODE classifier (``model_overrides``
    replace its keyword arguments, e.g. ``t1`` or ``tol``), cross-entropy, test accuracy."""
    from torchdyn_snopt.data import IMAGE_DATASETS, load_image_dataset

    check_choice("dataset", dataset, IMAGE_DATASETS)

    def build(data: tuple, sensitivity: str) -> nn.Module:
        return build_model(dataset, tuple(data[0].shape), sensitivity, **model_overrides)

    return Task(
        name=dataset,
        summary="conv features -> conv Neural ODE on [0, 1] -> linear head, cross-entropy",
        load=lambda: load_image_dataset(dataset),
        build=build,
        batch_size=batch_size,
        tol=model_overrides.get("tol", 1e-3),
        snopt_options=SNOPT_OPTIONS,
        max_nfe=MAX_NFE,
        train_eval_size=TRAIN_EVAL_ROWS,
    )


def _regularizer(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Table 6: kinetic + Jacobian-norm regularizer and NFE of the trained ODE."""
    from torchdyn_snopt.regularization import kinetic_jacobian

    with torch.no_grad():
        z = model.features(x)
    r = kinetic_jacobian(model.ode, z, model.t_span, generator=torch.Generator().manual_seed(0))
    return {
        "reg_kinetic": r["kinetic"],
        "reg_jacobian": r["jacobian"],
        "reg_total": r["total"],
        "nfe_eval": r["nfe_forward"],
    }


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
    """Run the image benchmark; returns ``{"summary": rows, "runs": [...], "files": [...]}``.

    A run whose ODE solve fails (the adaptive step size underflowed) is kept without points
    and with ``extra["diverged"] = 1``; one whose forward solve needs more than
    :data:`MAX_NFE` evaluations is stopped with ``extra["stalled"] = 1``.
    """
    spec = task(dataset, batch_size)
    check_run_args(tuple(optimizers), OPTIMIZERS, budget_s, seeds)
    check_choice("baseline_sensitivity", baseline_sensitivity, BASELINE_SENSITIVITIES)
    session = Session.open(device, out, quiet)
    chosen = {**DEFAULT_LRS[dataset], **(lrs or {})}
    data = session.to_device(spec.load())
    session.report(
        f"{dataset}: {len(data[0])} train / {len(data[2])} test images, batch {batch_size}, "
        f"{budget_s:g} s of training per run, device {session.device}"
    )
    # the logged training loss: the loss on the training rows at each point (the curve's value
    # there), not the mean of the minibatches since the previous one (kept as window_loss)
    base = Trial(spec, "", 0.0, 0, budget_s, sensitivity=baseline_sensitivity, train_set_loss=True)

    def after(trial: Trial, model: nn.Module, _: object, result: RunResult) -> None:
        if "eps" in trial.snopt_options:
            result.extra["eps"] = trial.snopt_options["eps"]
        if not sweep and not result.extra.get("diverged"):
            result.extra.update(_regularizer(model, data[2][:256]))

    if sweep:
        grid = [replace(base, optimizer=o, lr=lr) for o in optimizers for lr in SWEEP_LRS[o]]
        if "snopt" in optimizers:
            grid += [
                replace(base, optimizer="snopt", lr=chosen["snopt"], snopt_options={"eps": e},
                        tag=f" eps={e:g}")
                for e in SWEEP_EPS
            ]  # fmt: skip
        runs = session.run(grid, data, after=after)
        rows = grid_rows(runs)
        files = write_sweep(runs, rows, session.out, dataset)
    else:
        trials = [
            replace(base, optimizer=name, lr=chosen[name], seed=seed)
            for seed in range(seeds)
            for name in optimizers
        ]
        runs = session.run(trials, data, after=after, measure=True)
        rows = summary_rows(runs)
        files = write_outputs(
            runs,
            rows,
            session.out,
            f"image_{dataset}",
            f"{dataset}: {budget_s:g} s per run, {seeds} seed(s)",
            loss_label="training loss (training set)",
        )
    session.finish(
        rows,
        files,
        "learning rates: "
        + ", ".join(f"{o}={chosen[o]:g}" for o in optimizers)
        + ("" if sweep else f"; SNOpt options {SNOPT_OPTIONS}"),
    )
    return {"summary": rows, "runs": runs, "files": files}


#: The rows of a sweep (kept under the name ``bench timeseries`` and scripts use).
sweep_rows = grid_rows


def write_sweep(
    runs: list[RunResult], rows: list[dict[str, Any]], out: Path, dataset: str
) -> list[Path]:
    """JSON of the sweep and the Fig. 9 analogue: final accuracy per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [write_json(out / f"sweep_{dataset}.json", rows), out / f"sweep_{dataset}.png"]
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
