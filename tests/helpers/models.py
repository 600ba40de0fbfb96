"""Small float64 vector fields and models of the tests, each built from an explicit seed.

A field builder's parameters depend on its ``seed`` alone (default :data:`SEED`) and it does
not touch the caller's random stream, so two calls give bit-identical parameters: the same
field can be rebuilt for each sensitivity that is being compared.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE
from torchdyn.nn import DataControl, DepthCat, Fourier, GalLinear

from tests.helpers.numerics import (
    DTYPE,
    SEED,
    TOL,
    default_dtype,
    is_fixed,
    make_solver,
    seeded_init,
)

FieldFn = Callable[[], nn.Module]


def mlp_field(dim: int = 3, hidden: int = 16, seed: int = SEED) -> nn.Module:
    with seeded_init(seed):
        return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)).to(DTYPE)


def conv_field(channels: int = 3, seed: int = SEED) -> nn.Module:
    with seeded_init(seed):
        return nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(channels, channels, 3, padding=1),
        ).to(DTYPE)


def depthcat_field(dim: int = 3, hidden: int = 16, seed: int = SEED) -> nn.Module:
    with seeded_init(seed):
        return nn.Sequential(
            DepthCat(1), nn.Linear(dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, dim)
        ).to(DTYPE)


def datacontrol_field(dim: int = 3, hidden: int = 16, seed: int = SEED) -> nn.Module:
    with seeded_init(seed):
        return nn.Sequential(
            DataControl(), nn.Linear(2 * dim, hidden), nn.Tanh(), nn.Linear(hidden, dim)
        ).to(DTYPE)


class Float64Default(nn.Module):
    """Runs ``inner`` with float64 as torch's default dtype.

    torchdyn's ``GalLayer.calculate_weights`` builds its basis matrix with ``torch.eye`` in the
    default dtype and index-assigns the (float64) basis into it, which raises for a float64
    ``GalLinear`` under the float32 default.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        with default_dtype(DTYPE):
            return self.inner(x)


def galerkin_field(dim: int = 3, deg: int = 3, seed: int = SEED) -> nn.Module:
    with seeded_init(seed):
        layer = GalLinear(dim, dim, expfunc=Fourier(deg))
        net = nn.Sequential(DepthCat(1), layer, nn.Tanh()).to(DTYPE)
        with torch.no_grad():  # torchdyn zero-initialises the Galerkin coefficients
            layer.coeffs.normal_(0.0, 0.5)
            layer.dilation.fill_(1.3)
            layer.shift.fill_(0.2)
    return Float64Default(net)


def tiny_conv_field(channels: int = 2, seed: int = SEED) -> nn.Module:
    return conv_field(channels, seed)


def make_node(
    field: nn.Module,
    sensitivity: str,
    solver: str | nn.Module = "dopri5",
    *,
    tol: float = TOL,
    solver_adjoint: str | nn.Module | None = None,
    integral_loss: Callable | None = None,
    seminorm: bool = False,
) -> NeuralODE:
    """A NeuralODE with tight tolerances (adaptive) or torchdyn's defaults (fixed step).

    Fixed-step solvers ignore tolerances; passing torchdyn's defaults avoids its warning.
    """
    solver = make_solver(solver) if isinstance(solver, str) else solver
    if isinstance(solver_adjoint, str) and sensitivity.startswith("snopt"):
        solver_adjoint = make_solver(solver_adjoint)
    kw = {} if is_fixed(solver) else {"atol": tol, "rtol": tol}
    return NeuralODE(
        field,
        sensitivity=sensitivity,
        solver=solver,
        solver_adjoint=solver_adjoint,
        atol_adjoint=tol,
        rtol_adjoint=tol,
        integral_loss=integral_loss,
        seminorm=seminorm,
        **kw,
    )


class LinearField(nn.Module):
    """``F(t, x) = W x + b``: trajectory and adjoint in closed form via matrix exponentials."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, t, x, args=None):
        return self.lin(x)


class TwoLayerField(nn.Module):
    """``F(t, x) = l2(tanh(l1(x)))``."""

    def __init__(self, dim: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, t, x, args=None):
        return self.l2(torch.tanh(self.l1(x)))


class OdeClassifier(nn.Module):
    """Linear encoder → NeuralODE → linear head.

    ``solver="rk4"`` uses ``t = linspace(0, 1, 5)``; adaptive solvers ``[0, 1]`` at ``tol``.
    """

    def __init__(
        self,
        d_in: int = 6,
        dim: int = 4,
        hidden: int = 8,
        classes: int = 3,
        sensitivity: str = "snopt",
        solver: str = "rk4",
        tol: float = 1e-3,
    ) -> None:
        super().__init__()
        self.enc = nn.Linear(d_in, dim)
        self.ode = NeuralODE(
            TwoLayerField(dim, hidden),
            sensitivity=sensitivity,
            solver=solver,
            atol=tol,
            rtol=tol,
            atol_adjoint=tol,
            rtol_adjoint=tol,
            return_t_eval=False,
        )
        t = torch.linspace(0, 1, 5) if solver == "rk4" else torch.tensor([0.0, 1.0])
        self.register_buffer("t", t)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.ode(torch.tanh(self.enc(x)), self.t)[-1])


class ConstantField(nn.Module):
    """``F(t, x) = b`` with one trained scalar ``b``: ``x(T) = x0 + b·T`` in closed form."""

    def __init__(self, b: float = 0.5) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor([b], dtype=DTYPE))

    def forward(self, t, x, args=None):
        return self.b.expand_as(x)


def quiet_ffjord(**kw) -> nn.Module:
    """A :class:`torchdyn_snopt.models.FFJORD` built without torchdyn's wrapping notice on
    stdout (it prints one line per ``NeuralODE`` whose field lacks a ``t`` argument)."""
    from torchdyn_snopt.models import FFJORD

    with contextlib.redirect_stdout(io.StringIO()):
        return FFJORD(**kw)


def quiet_node(field: nn.Module, **kw) -> NeuralODE:
    """``NeuralODE(field, **kw)`` without torchdyn's wrapping notice on stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        return NeuralODE(field, **kw)
