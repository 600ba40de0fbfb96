"""Neural controlled differential equation (Kidger et al. 2020b) solved as a torchdyn NeuralODE.

``dz = g(z) dX(t)`` with ``X`` the interpolation of the observations (torchcde) becomes the ODE
``dz/dt = g(z) dX/dt``, integrated by a ``NeuralODE`` with the snopt sensitivity, so SNOpt's
curvature (eq. 13) covers the layers of ``g``.

torchcde is imported when a model is built (the ``cde`` extra), not when this module is.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE

from torchdyn_snopt._extras import require

if TYPE_CHECKING:
    from torchcde.interpolation_base import InterpolationBase as Path

INTERPOLATIONS: tuple[str, ...] = ("hermite", "natural", "linear")
#: torchcde's coefficient function of each interpolation.
_COEFF_FUNCTIONS: dict[str, str] = {
    "hermite": "hermite_cubic_coefficients_with_backward_differences",
    "natural": "natural_cubic_coeffs",
    "linear": "linear_interpolation_coeffs",
}


def _torchcde() -> ModuleType:
    return require("torchcde", "the Neural CDE model")


def _coeff_function(interpolation: str) -> Callable[[Tensor, Tensor], Tensor]:
    return getattr(_torchcde(), _COEFF_FUNCTIONS[interpolation])


class CDEFunc(nn.Module):
    """``g(z)``: ``(..., hidden)`` → ``(..., hidden, channels)``, an MLP with a tanh output."""

    def __init__(self, channels: int, hidden: int, width: int) -> None:
        super().__init__()
        self.channels, self.hidden = channels, hidden
        self.net = nn.Sequential(
            nn.Linear(hidden, width), nn.Softplus(), nn.Linear(width, hidden * channels), nn.Tanh()
        )

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return self.net(z).view(*z.shape[:-1], self.hidden, self.channels)


class CDEField(nn.Module):
    """``F(t, z) = g(t, z) · dX/dt`` for the control path :attr:`X` set before each solve."""

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        self.func = func
        self.X: Path | None = None

    def forward(self, t: Tensor, z: Tensor, args: dict | None = None) -> Tensor:
        if self.X is None:
            raise RuntimeError("CDEField.X is unset: assign the control path before solving")
        dX = self.X.derivative(t.reshape(()))  # torchdyn may pass t with shape (1,)
        return (self.func(t, z) @ dX.unsqueeze(-1)).squeeze(-1)


def unit_times(length: int, like: Tensor) -> Tensor:
    """``length`` equally spaced path times on ``[0, 1]`` (the solve's interval)."""
    return torch.linspace(0.0, 1.0, length, dtype=like.dtype, device=like.device)


def control_path(coeffs: Tensor, interpolation: str) -> Path:
    """torchcde's path for coefficients of ``interpolation`` (one of INTERPOLATIONS) built on
    :func:`unit_times` (linear coefficients hold one row per observation, cubic ones one row
    per interval)."""
    torchcde = _torchcde()
    if interpolation == "linear":
        return torchcde.LinearInterpolation(coeffs, unit_times(coeffs.shape[-2], coeffs))
    return torchcde.CubicSpline(coeffs, unit_times(coeffs.shape[-2] + 1, coeffs))


class NeuralCDE(nn.Module):
    """Neural CDE classifier; its input is the interpolation *coefficients* of the series.

    Build them once per dataset with :meth:`coefficients` (torchcde fills missing values, which
    is slow, so it must not run every forward pass). The path is parametrised over ``[0, 1]``
    (observation ``k`` of ``L`` at ``k / (L - 1)``; irregular sampling lives in the time
    channel): a CDE is invariant under this reparametrisation, and it keeps the Gauss-Newton
    scale ``q = a / sqrt(t1 - t0)`` of the curvature (§3.2) that of a unit horizon. Series
    ``(N, L, channels)`` with time as channel 0, NaN for missing values and NaN padding after
    the end of a shorter series (filled with its last value: the path is then constant and
    ``z`` stops).

    Args:
        channels: input channels of the path, time included.
        num_classes: output logits.
        hidden: state size (default 32).
        width: inner width of ``g`` (64).
        interpolation: "hermite" (cubic Hermite with backward differences, default),
            "natural" (natural cubic spline) or "linear".
        sensitivity: of the ``NeuralODE`` (default "snopt").
        solver: of the ``NeuralODE`` (default rk4, one step per observation interval).
        tol: atol = rtol of adaptive solvers.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        hidden: int = 32,
        width: int = 64,
        interpolation: str = "hermite",
        sensitivity: str = "snopt",
        solver: str | nn.Module = "rk4",
        tol: float = 1e-3,
    ) -> None:
        super().__init__()
        _torchcde()  # fail at construction, with the install command, when torchcde is missing
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation={interpolation!r} is invalid; accepted: {', '.join(INTERPOLATIONS)}"
            )
        self.channels, self.interpolation = channels, interpolation
        self.initial = nn.Linear(channels, hidden)
        self.func = CDEFunc(channels, hidden, width)
        self.ode = NeuralODE(
            CDEField(self.func),
            sensitivity=sensitivity,
            solver=solver,
            atol=tol,
            rtol=tol,
            atol_adjoint=tol,
            rtol_adjoint=tol,
            return_t_eval=False,
        )
        self.head = nn.Linear(hidden, num_classes)

    def coefficients(self, x: Tensor) -> Tensor:
        """torchcde coefficients of ``x`` ``(N, L, channels)`` for this model's interpolation."""
        if x.dim() != 3 or x.shape[-1] != self.channels:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; accepted: (N, L, channels={self.channels})"
            )
        return _coeff_function(self.interpolation)(x, unit_times(x.shape[-2], x))

    def path(self, coeffs: Tensor) -> Path:
        return control_path(coeffs, self.interpolation)

    def trajectory(self, coeffs: Tensor) -> Tensor:
        """``z`` at every observation time: ``(L, N, hidden)``."""
        X = self.path(coeffs)
        self.ode.vf.vf.X = X
        z0 = self.initial(X.evaluate(X.interval[0]))
        return self.ode(z0, X.grid_points)

    def forward(self, coeffs: Tensor) -> Tensor:
        return self.head(self.trajectory(coeffs)[-1])
