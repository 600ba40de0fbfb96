"""A stepping loop over torchdyn's own solvers that reports every accepted step.

torchdyn's ``odeint`` hides which steps it accepts; the backward pass needs them to sample
curvature only at accepted states (never at Runge-Kutta stages or rejected trials). The loop
below calls ``solver.step`` exactly as torchdyn does (same error norm, step-size control and
initial step), with an optional semi-norm (Kidger et al. 2020a) that measures the error on the
first ``seminorm_dim`` entries only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchdyn.numerics.solvers.ode import RungeKutta4 as _TorchdynRK4
from torchdyn.numerics.solvers.templates import DiffEqSolver
from torchdyn.numerics.utils import adapt_step, hairer_norm, init_step

Dynamics = Callable[[Tensor, Tensor], Tensor]
OnAccept = Callable[[Tensor, Tensor], None]

#: Smallest step (relative to the interval) before the solve is declared stuck.
_MIN_RELATIVE_STEP = 1e-12


class RungeKutta4(_TorchdynRK4):
    """Classical RK4 with its stages at ``t, t + dt/2, t + dt/2, t + dt``.

    torchdyn 1.0.6's ``rk4`` reads the stage times of ``k2, k3, k4`` from ``c = [0, ½, ½, 1]``
    starting at its first entry, so they land at ``t, t + dt/2, t + dt/2``: exact for
    autonomous fields, first-order accurate for time-dependent ones (``DepthCat``, Galerkin).
    :func:`with_fixed_rk4` puts it in place of torchdyn's in every solve of this package (the
    user's solver object itself is left as it is).
    """

    def step(
        self, f: Callable, x: Tensor, t: Tensor, dt: Tensor, k1: Tensor | None = None, args=None
    ) -> tuple[None, Tensor, None]:
        k1 = f(t, x) if k1 is None else k1
        half = dt / 2
        k2 = f(t + half, x + half * k1)
        k3 = f(t + half, x + half * k2)
        k4 = f(t + dt, x + dt * k3)
        return None, x + dt / 6 * (k1 + 2 * (k2 + k3) + k4), None


def with_fixed_rk4(solver: torch.nn.Module) -> torch.nn.Module:
    """``solver``, or :class:`RungeKutta4` in its dtype when it is torchdyn's ``rk4``."""
    if type(solver) is _TorchdynRK4:
        return RungeKutta4(dtype=solver.dtype)
    return solver


def integrate(
    f: Dynamics,
    y: Tensor,
    s0: Tensor,
    s1: Tensor,
    solver: DiffEqSolver,
    atol: float,
    rtol: float,
    seminorm_dim: int | None = None,
    on_accept: OnAccept | None = None,
    args: dict | None = None,
) -> Tensor:
    """Integrate ``dy/ds = f(s, y)`` from ``s0`` to ``s1 > s0``; returns ``y(s1)``.

    Fixed-step solvers take one step over the interval (as torchdyn's adjoint does between
    consecutive ``t_span`` points). ``on_accept(s, y)`` is called after each accepted step.
    """
    solver = with_fixed_rk4(solver)
    y, _ = solver.sync_device_dtype(y, s0.reshape(1))
    args = args if args is not None else {}
    if solver.stepping_class == "fixed":
        y = solver.step(f, y, s0, s1 - s0, args=args)[1]
        if on_accept is not None:
            on_accept(s1, y)
        return y

    s = s0
    k1 = f(s, y)
    dt = init_step(f, k1, y, s, solver.order, atol, rtol).reshape(())
    # torchdyn keeps safety/min/max factors as 1-element float32 tensors: in its adapt_step
    # they would turn dt (and so the running time s + dt) into float32. Hold them in s's dtype.
    safety, min_factor, max_factor = (
        c.to(s).reshape(()) for c in (solver.safety, solver.min_factor, solver.max_factor)
    )
    span = float(s1 - s0)
    n = y.numel() if seminorm_dim is None else seminorm_dim
    while s < s1:
        last = bool(s + dt >= s1)
        if last:
            dt = s1 - s
        if float(dt) < _MIN_RELATIVE_STEP * max(span, 1.0):
            raise RuntimeError(
                f"the adjoint solve's step size underflowed (dt={float(dt):.3e}) at "
                f"t={-float(s):.6g}; loosen atol_adjoint/rtol_adjoint, pick a more stable "
                "solver_adjoint or lower the learning rate"
            )
        f_new, y_new, err = solver.step(f, y, s, dt, k1=k1, args=args)[:3]
        y_n, y_new_n = y[:n], y_new[:n]
        scale = atol + rtol * torch.max(y_n.abs(), y_new_n.abs())
        ratio = hairer_norm(err[:n] / scale)
        if not torch.isfinite(ratio):
            # Non-finite adjoint: hand it back so the optimizer can skip the step.
            return y_new
        if ratio <= 1:
            s = s1 if last else s + dt
            y, k1 = y_new, f_new
            if on_accept is not None:
                on_accept(s, y)
        dt = adapt_step(dt, ratio.to(s), safety, min_factor, max_factor, solver.order)
    return y
