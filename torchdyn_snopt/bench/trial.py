"""One run of a bench: a :class:`Trial` (task, optimizer, rate, seed, budget) and
:func:`run_trial`, which seeds, builds, trains under one of two protocols and flags it.

- :data:`TEST_CURVE` (``bench image``, ``timeseries``, ``cnf``, ``second-order``,
  ``horizon``): the logged training loss is the mean minibatch loss since the previous
  evaluation (with ``Trial.train_set_loss``, as ``bench image`` sets it: the task's loss on
  its training evaluation rows, untimed, first point at 0 s) and the task's test metric is
  evaluated at every logged point; a solver failure drops the run's points (a warning,
  ``extra["diverged"] = 1``).
- :data:`TRAIN_CURVE` (``bench suite``): the logged training loss is the task's loss on its
  training evaluation rows (untimed, first point at 0 s); the test metric is evaluated once,
  on the final model; a failed run keeps what it logged; the minibatch stream is seeded per
  (task, seed); runs are flagged ``diverged`` / ``stalled`` by :func:`flag_run`.
"""

from __future__ import annotations

import math
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from torchdyn_snopt.bench import optimizers
from torchdyn_snopt.bench.loop import Data, cap_of, is_failure, solve_cap, train_for
from torchdyn_snopt.bench.memory import peak_memory_mb
from torchdyn_snopt.bench.records import RunResult
from torchdyn_snopt.bench.task import Task, mean_loss, quiet_build, test_metric

TEST_CURVE = "test-curve"
TRAIN_CURVE = "train-curve"
PROTOCOLS: tuple[str, ...] = (TEST_CURVE, TRAIN_CURVE)
#: A train-curve run stalls when its final training loss is not below
#: ``initial − (1 − STALL) |initial|`` (for a positive loss: not below 0.9x the initial).
STALL = 0.9

#: ``setup(trial, model, optimizer)``: called once both exist, before training.
Setup = Callable[["Trial", nn.Module, torch.optim.Optimizer], None]
#: ``after(trial, model, optimizer, result)``: called once training ended (failed or not).
After = Callable[["Trial", nn.Module, torch.optim.Optimizer, RunResult], None]


@dataclass(frozen=True)
class Trial:
    """One run: ``task`` trained by ``optimizer`` at rate ``lr`` from seed ``seed`` for
    ``budget_s`` training seconds (or ``max_iterations`` iterations, with ``budget_s`` inf).

    ``snopt_options`` override the task's; ``sensitivity`` is the backward solver of the
    optimizers other than SNOpt (SNOpt always uses ``"snopt"``); ``n_evals`` (None: the
    task's) evaluations are spread evenly over the budget, plus one every ``eval_every``
    iterations; ``train_set_loss``: log the loss on the task's training evaluation rows as the
    training loss under :data:`TEST_CURVE` too (:data:`TRAIN_CURVE` always does); ``tag`` is
    appended to the run's label.
    """

    task: Task
    optimizer: str
    lr: float
    seed: int
    budget_s: float
    weight_decay: float = 0.0
    snopt_options: Mapping[str, Any] = field(default_factory=dict)
    sensitivity: str = "snopt"
    protocol: str = TEST_CURVE
    n_evals: int | None = None
    max_iterations: int | None = None
    eval_every: int | None = None
    train_set_loss: bool = False
    tag: str = ""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol={self.protocol!r} is unknown; accepted: {', '.join(PROTOCOLS)}"
            )

    @property
    def label(self) -> str:
        """``seed S NAME lr=LR`` and the tag: the progress bar's description."""
        return f"seed {self.seed} {self.optimizer} lr={self.lr:g}{self.tag}"

    def model_sensitivity(self) -> str:
        """The backward solver of this run's model."""
        return "snopt" if self.optimizer.startswith("snopt") else self.sensitivity


def batch_seed(task: str, seed: int) -> int:
    """Seed of the minibatch stream of ``(task, seed)`` in a train-curve run: the same for
    every optimizer, different across tasks."""
    return zlib.crc32(f"{task}/{seed}".encode())


def flag_run(r: RunResult) -> None:
    """Set ``r.extra["diverged"]`` (an error, no points or a non-finite logged loss) or
    ``["stalled"]`` (final loss not below :data:`STALL` of the first) to 1.0."""
    losses = [p.train_loss for p in r.points]
    if r.error or not losses or not all(math.isfinite(v) for v in losses):
        r.extra["diverged"] = 1.0
    elif losses[-1] > losses[0] - (1 - STALL) * abs(losses[0]):
        r.extra["stalled"] = 1.0


def measure_memory(
    task: Task, model: nn.Module, opt: torch.optim.Optimizer, data: Data, device: torch.device
) -> float:
    """Peak memory (MB) of a training step on the first ``task.batch_size`` training rows
    (three more steps of ``opt``: do it after everything else about the trained model)."""
    xb, yb = data[0][: task.batch_size], data[1][: task.batch_size]

    def step() -> None:
        opt.zero_grad()
        task.loss(model, xb, yb).backward()
        opt.step()

    return peak_memory_mb(step, model, device)


def run_trial(
    trial: Trial,
    data: Data,
    progress: Callable[[float], None] | None = None,
    *,
    device: torch.device | None = None,
    setup: Setup | None = None,
    after: After | None = None,
    measure: bool = False,
) -> RunResult:
    """Seed torch with ``trial.seed``, build the task's model on ``device`` (default: CPU;
    ``data`` must already be there) and its optimizer, train under ``trial.protocol`` and
    return the result. ``after`` runs on the trained model; then, with ``measure``, the
    peak memory of a step is recorded unless the run diverged. ``extra["wall_s"]`` of a
    train-curve run: the whole call's seconds (set-up and evaluations included)."""
    task, start = trial.task, time.perf_counter()
    torch.manual_seed(trial.seed)
    model = quiet_build(task, data, trial.model_sensitivity())
    if device is not None:
        model = model.to(device)
    make = task.make_optimizer or optimizers.make_optimizer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # uncovered parameters get the plain gradient
        opt = make(
            trial.optimizer,
            model,
            trial.lr,
            {**task.snopt_options, **trial.snopt_options},
            trial.weight_decay,
        )
    if setup is not None:
        setup(trial, model, opt)
    train_curve = trial.protocol == TRAIN_CURVE
    n = task.train_eval_size
    x_eval, y_eval = data[0][:n], data[1][:n]
    result = train_for(
        model,
        opt,
        data,
        trial.budget_s,
        name=trial.optimizer,
        lr=trial.lr,
        seed=trial.seed,
        batch_size=task.batch_size,
        n_evals=trial.n_evals or task.n_evals,
        progress=progress,
        before_step=getattr(opt, "set_batch", None),
        loss_fn=task.loss,
        eval_fn=(lambda *_: (math.nan, math.nan)) if train_curve else task.test,
        train_eval_fn=(
            (lambda m: mean_loss(task, m, x_eval, y_eval))
            if train_curve or trial.train_set_loss
            else None
        ),
        batch_seed=batch_seed(task.name, trial.seed) if train_curve else None,
        max_nfe=task.max_nfe,
        catch_failures=True,
        keep_partial=train_curve,
        max_iterations=trial.max_iterations,
        eval_every=trial.eval_every,
    )
    if train_curve:
        if result.points:
            try:
                # capped as the run's own solves: exploded weights can stall one for hours
                with solve_cap(model, cap_of(task.max_nfe)):
                    loss, acc = test_metric(task, model, data[2], data[3])
            except (RuntimeError, ValueError) as err:
                if not is_failure(err, model):
                    raise
                loss, acc, result.error = math.nan, math.nan, result.error or str(err)
            result.points[-1].test_loss, result.points[-1].test_acc = loss, acc
        flag_run(result)
        result.extra["wall_s"] = time.perf_counter() - start
    if after is not None:
        after(trial, model, opt, result)
    if measure and not result.extra.get("diverged"):
        result.peak_memory_mb = measure_memory(task, model, opt, data, device or data[0].device)
    return result
