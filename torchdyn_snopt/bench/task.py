"""What a bench trains: a :class:`Task` describes data, model, loss, metric and settings.

A task only *describes* a problem; :mod:`~torchdyn_snopt.bench.trial` trains it and
:mod:`~torchdyn_snopt.bench.session` runs and reports a comparison. Each bench module builds
its tasks from its own models, data and defaults.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from torchdyn_snopt.bench.loop import Data, EvalFn, LossFn, evaluate

#: The test metrics a task can have: classifiers, regression, density models.
METRICS: tuple[str, ...] = ("accuracy", "mse", "nll")
#: ``make_optimizer(name, model, lr, snopt_options, weight_decay)``.
OptimizerFactory = Callable[
    [str, nn.Module, float, Mapping[str, Any], float], torch.optim.Optimizer
]


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``model(x)`` ``(B, classes)`` against labels ``y`` ``(B,)``."""
    return F.cross_entropy(model(x), y)


def mse(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error of ``model(x)`` against ``y`` (same shape)."""
    return F.mse_loss(model(x), y)


@dataclass(frozen=True)
class Task:
    """One benchmark problem and everything fixed about it.

    ``load()`` returns the (deterministic) data; ``build(data, sensitivity)`` the model with
    that backward solver (the caller seeds torch first, so the seed fixes the initial
    weights); ``loss(model, x, y)`` the training loss of a minibatch (a scalar tensor);
    ``metric`` one of :data:`METRICS` (see :func:`test_metric`). ``evaluate(model, x, y)``:
    ``(test loss, test accuracy)`` at each logged point of a test-curve run (default:
    :func:`test_metric`). ``train_eval_size``: the first rows of the training set on which a
    train-curve run logs its training loss (None: all of them). ``max_nfe``: forward field
    evaluations per iteration above which a run counts as stalled (a too-stiff ODE).
    ``snopt_options``: the keyword arguments of ``snopt`` besides ``lr``. ``make_optimizer``:
    the optimizer factory (None: :func:`~torchdyn_snopt.bench.optimizers.make_optimizer`).
    """

    name: str
    summary: str
    load: Callable[[], Data]
    build: Callable[[Data, str], nn.Module]
    loss: LossFn = cross_entropy
    metric: str = "accuracy"
    batch_size: int = 128
    solver: str = "dopri5"
    tol: float | None = 1e-3
    snopt_options: Mapping[str, Any] = field(default_factory=dict)
    train_eval_size: int | None = None
    max_nfe: int | None = None
    n_evals: int = 30
    evaluate: EvalFn | None = None
    make_optimizer: OptimizerFactory | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric={self.metric!r} is unknown; accepted: {', '.join(METRICS)}")

    def describe(self) -> str:
        """One line: the task's model, data and solver settings."""
        tol = "fixed step" if self.tol is None else f"tol {self.tol:g}"
        return f"{self.name}: {self.summary}; batch {self.batch_size}, {self.solver} ({tol})"

    def test(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
        """``(test loss, test accuracy)`` of a logged point: :attr:`evaluate` or
        :func:`test_metric`."""
        if self.evaluate is not None:
            return self.evaluate(model, x, y)
        return test_metric(self, model, x, y)


def quiet_build(task: Task, data: Data, sensitivity: str = "snopt") -> nn.Module:
    """``task.build(data, sensitivity)`` without torchdyn's one-line notices on stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        return task.build(data, sensitivity)


#: Rows per chunk when a loss is evaluated on a whole split.
EVAL_CHUNK = 1000


@torch.no_grad()
def mean_loss(task: Task, model: nn.Module, x: Tensor, y: Tensor) -> float:
    """``task.loss`` averaged over all rows of ``(x, y)`` in chunks, without gradients and in
    eval mode (a density model's plain NLL); random draws inside (Hutchinson noise) come from
    a fixed seed and leave the global RNG as it was."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(12345)
            for i in range(0, len(x), EVAL_CHUNK):
                xb, yb = x[i : i + EVAL_CHUNK], y[i : i + EVAL_CHUNK]
                nll = getattr(model, "nll", None)
                loss = nll(xb) if task.metric == "nll" and nll else task.loss(model, xb, yb)
                total += float(loss) * len(xb)
    finally:
        model.train(was_training)
    return total / len(x)


def test_metric(task: Task, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """``(test loss, test accuracy)`` as :class:`~torchdyn_snopt.bench.records.Point` stores
    them: cross-entropy and accuracy for classifiers, ``(MSE, NaN)`` for regression,
    ``(NLL in nats, NaN)`` for density models."""
    if task.metric == "accuracy":
        return evaluate(model, x, y, batch=EVAL_CHUNK)
    return mean_loss(task, model, x, y), math.nan
