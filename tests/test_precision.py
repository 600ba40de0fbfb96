"""Precision ladder: every derivative the package returns, in float64, against an independent
reference, at tolerances 1e-6, 1e-9 and 1e-12.

Reference: autograd through a fine classical RK4 solve written here (stage times ``t``,
``t + h/2``, ``t + h/2``, ``t + h``; ``N_REF`` steps per ``t_span`` interval, local error
``O(h⁵)``), so the truth shares no code with the package or torchdyn's solvers. Each block (every
parameter tensor, ``x0``, ``t_span``) is compared on its own relative error. The error must fall
as the tolerance tightens and reach :data:`FLOOR` (first order) or :data:`FLOOR_2` (Hessian,
HVP) at 1e-12.

Kills: the backward solve's time drifting to float32 (before the fix: 1.5e-4 relative at 1e-12
on the time-dependent field near t = 40, growing as the tolerance tightened); a dropped adjoint
jump at an interior output; a wrong time sign for a decreasing span; a missing ``ℓ(t1)`` term
in ``∂L/∂t1`` with an integral loss.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE
from torchdyn.nn import DepthCat
from torchdyn.numerics.solvers.ode import SOLVER_DICT

import torchdyn_snopt as tds
from tests.helpers.reference import rk4_interval
from torchdyn_snopt.second_order import hessian, hvp, rank_r

pytestmark = pytest.mark.timeout(300)

D = torch.float64
TOLS = (1e-6, 1e-9, 1e-12)
#: Relative error each first-order block must reach at tolerance 1e-12.
FLOOR = 1e-9
#: Same for the Hessian and Hessian-vector products.
FLOOR_2 = 1e-8
#: RK4 steps per t_span interval of the reference.
N_REF = 600


def field(time_dependent: bool, dim: int = 2, hidden: int = 6, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    head = [DepthCat(1), nn.Linear(dim + 1, hidden)] if time_dependent else [nn.Linear(dim, hidden)]
    net = nn.Sequential(*head, nn.Tanh(), nn.Linear(hidden, dim)).to(D)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D) * 0.5)
    return net


def x0_of(dim: int = 2, batch: int = 3) -> Tensor:
    return torch.randn(batch, dim, generator=torch.Generator().manual_seed(1), dtype=D)


def traj_loss(sol: Tensor) -> Tensor:
    w = torch.arange(1, len(sol) + 1, dtype=sol.dtype).reshape(-1, 1, 1)
    return (w * (torch.sin(sol) + 0.3 * sol**2)).sum()


def ell(t: Tensor, x: Tensor) -> Tensor:
    return 0.5 * (x**2).sum(-1) * (1 + 0.1 * t)


def node_of(net: nn.Module, tol: float, integral: bool = False) -> NeuralODE:
    return NeuralODE(
        net,
        sensitivity="snopt",
        solver=SOLVER_DICT["dopri5"](dtype=D),
        solver_adjoint=SOLVER_DICT["dopri5"](dtype=D),
        atol=tol,
        rtol=tol,
        atol_adjoint=tol,
        rtol_adjoint=tol,
        integral_loss=ell if integral else None,
    )


def rk4(f: Callable[[Tensor, Tensor], Tensor], x: Tensor, t_span: Tensor, n: int | None = None):
    """Classical RK4 (:func:`tests.helpers.reference.rk4_interval`), ``n`` steps per interval,
    on the state augmented by ``c = ∫ ℓ dt``; returns the states at every ``t_span`` point and the
    integral loss at the last."""
    n = n or N_REF
    m = x.numel()

    def augmented(t: Tensor, z: Tensor) -> Tensor:
        xt = z[:m].reshape(x.shape)
        return torch.cat([f(t, xt).reshape(-1), ell(t, xt).sum().reshape(1)])

    z = torch.cat([x.reshape(-1), x.new_zeros(1)])
    out = [x]
    for k in range(len(t_span) - 1):
        z = rk4_interval(augmented, z, t_span[k], t_span[k + 1], n)
        out.append(z[:m].reshape(x.shape))
    return torch.stack(out), z[m]


def rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


CASES = {
    # name: (time-dependent field, t_span, integral loss)
    "autonomous": (False, [0.0, 0.5, 1.0], False),
    "time-dependent far from 0": (True, [40.0, 40.4, 41.0], False),
    "decreasing span": (True, [1.0, 0.6, 0.0], False),
    "integral loss": (True, [0.0, 0.7, 1.2], True),
}


def _first_order(case: str, tol: float | None) -> list[Tensor]:
    """[∂L/∂θ per tensor..., ∂L/∂x0, ∂L/∂t_span]; ``tol=None`` = the RK4 reference."""
    tdep, ts, integral = CASES[case]
    net = field(tdep)
    t_span = torch.tensor(ts, dtype=D, requires_grad=True)
    x = x0_of().requires_grad_(True)
    node = node_of(net, tol or 1e-6, integral)
    if tol is None:
        sol, c = rk4(node.vf, x, t_span)
        loss = traj_loss(sol) + (c if integral else 0.0)
    else:
        _, sol = node(x, t_span)
        loss = traj_loss(sol)  # the integral term enters through the adjoint
    return list(torch.autograd.grad(loss, [*net.parameters(), x, t_span]))


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_fall_with_tolerance_per_block(case):
    ref = _first_order(case, None)
    errs = {tol: [rel(g, r) for g, r in zip(_first_order(case, tol), ref)] for tol in TOLS}
    names = [f"theta[{i}]" for i in range(len(ref) - 2)] + ["x0", "t_span"]
    worst = {tol: max(e) for tol, e in errs.items()}
    assert worst[1e-12] <= FLOOR, dict(zip(names, errs[1e-12]))
    assert worst[1e-12] < worst[1e-6], worst
    assert worst[1e-9] < worst[1e-6], worst


# --------------------------------------------------------------------------- second order

SECOND = {
    # name: (time-dependent field, t_span); the dense Hessian costs O(n²) per evaluation, so
    # one case: the hardest of the first-order ones (time-dependent, far from 0, 3 points).
    "time-dependent far from 0": (True, [40.0, 40.4, 41.0]),
}


def _direction(net: nn.Module) -> list[Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(p.shape, generator=g, dtype=D) for p in net.parameters()]


def _reference_hvp(case: str) -> tuple[list[Tensor], Tensor]:
    """``L_θθ v`` per parameter tensor (double backward through RK4) and the dense ``v``."""
    tdep, ts = SECOND[case]
    net = field(tdep)
    node = node_of(net, 1e-6)
    params = list(net.parameters())
    v = _direction(net)
    sol, _ = rk4(node.vf, x0_of(), torch.tensor(ts, dtype=D))
    g = torch.autograd.grad(traj_loss(sol), params, create_graph=True)
    hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)
    return list(hv), torch.cat([t.reshape(-1) for t in v])


def _split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    return [c.reshape(p.shape) for c, p in zip(flat.split([p.numel() for p in like]), like)]


@pytest.mark.parametrize("case", list(SECOND))
def test_theorem1_hessian_and_hvp_fall_with_tolerance_per_block(case):
    """Dense Theorem-1 Hessian (times a direction) and the O(1)-memory HVP, per parameter.
    Before the float64 time fix the time-dependent Hessian was off by ~7e-6 at 1e-11."""
    tdep, ts = SECOND[case]
    ref, v = _reference_hvp(case)
    errs: dict[str, dict[float, float]] = {"hessian": {}, "hvp": {}}
    for tol in TOLS:
        net = field(tdep)
        node, t_span = node_of(net, tol), torch.tensor(ts, dtype=D)
        like = list(net.parameters())
        h = hessian(node, x0_of(), traj_loss, t_span)
        hv_dense = _split(h @ v, like)
        hv = hvp(node, x0_of(), traj_loss, v, t_span)
        hv = _split(hv, like) if isinstance(hv, Tensor) else list(hv)
        errs["hessian"][tol] = max(rel(a, b) for a, b in zip(hv_dense, ref))
        errs["hvp"][tol] = max(rel(a, b) for a, b in zip(hv, ref))
    for name, e in errs.items():
        assert e[1e-12] <= FLOOR_2, (name, e)
        assert e[1e-12] < e[1e-6] and e[1e-9] < e[1e-6], (name, e)


def test_proposition2_vectors_fall_with_tolerance_per_block():
    """eq. 11: ``q_i(t0) = (∂x(t1)/∂x0)ᵀ y_i`` and ``p_i = (∂x(t1)/∂θ)ᵀ y_i`` (VJPs through
    the RK4 reference), on the time-dependent field far from t = 0."""
    net = field(True)
    t_span = torch.tensor([40.0, 41.0], dtype=D)
    y = torch.randn(2, 3, 2, generator=torch.Generator().manual_seed(3), dtype=D)
    x = x0_of().requires_grad_(True)
    sol, _ = rk4(node_of(net, 1e-6).vf, x, t_span)
    params = list(net.parameters())
    ref_q, ref_p = [], []
    for yi in y:
        g = torch.autograd.grad(sol[-1], [x, *params], yi, retain_graph=True)
        ref_q.append(g[0])
        ref_p.append(torch.cat([t.reshape(-1) for t in g[1:]]))
    errs = {}
    for tol in TOLS:
        out = rank_r(node_of(net, tol), x0_of(), y, t_span)
        blocks = [rel(out.q[i], ref_q[i]) for i in range(2)]
        for i in range(2):
            blocks += [
                rel(a, b) for a, b in zip(_split(out.p[i], params), _split(ref_p[i], params))
            ]
        errs[tol] = max(blocks)
    assert errs[1e-12] <= FLOOR, errs
    assert errs[1e-12] < errs[1e-6] and errs[1e-9] < errs[1e-6], errs


def test_free_horizon_dl_dt_falls_with_tolerance():
    """``∂L/∂T`` of :class:`tds.FreeHorizon` (through the snopt ``t_span`` gradient) with a
    3-point grid rescaled onto ``[t0, T]``, against autograd through RK4 with ``T`` a variable
    (every output's time moves with ``T``, so interior adjoint jumps enter)."""
    t0, T = 40.0, 40.9
    base = torch.tensor([0.0, 0.4, 1.0], dtype=D)
    net = field(True)

    def reference() -> float:
        t1 = torch.tensor(T, dtype=D, requires_grad=True)
        t_span = t0 + base * (t1 - t0)
        sol, _ = rk4(node_of(net, 1e-6).vf, x0_of(), t_span)
        return float(torch.autograd.grad(traj_loss(sol), t1)[0])

    ref = reference()
    errs = {}
    for tol in TOLS:
        node = node_of(net, tol)
        node.return_t_eval = False
        horizon = tds.FreeHorizon(t0=t0, t1=T, penalty=0.0, policy="baseline").attach(node)
        traj_loss(node(x0_of(), base)).backward()
        horizon.step()
        errs[tol] = abs(horizon.last["dL_dT"] - ref) / abs(ref)
    assert errs[1e-12] <= FLOOR, errs
    assert errs[1e-12] < errs[1e-6] and errs[1e-9] < errs[1e-6], errs


def test_rk4_is_fourth_order_on_time_dependent_fields():
    """torchdyn 1.0.6's rk4 evaluates its last stage at ``t + dt/2`` instead of ``t + dt``
    (first order on a time-dependent field); the snopt sensitivities use a corrected RK4.
    Halving the step must cut the error ~16x. Kills: keeping torchdyn's stage times (~2x)."""
    net = field(True)
    x = x0_of()
    ref, _ = rk4(node_of(net, 1e-6).vf, x, torch.tensor([0.0, 1.0], dtype=D))
    errs = []
    for n in (8, 16):
        node = NeuralODE(net, sensitivity="snopt", solver="rk4").to(D)
        _, sol = node(x, torch.linspace(0.0, 1.0, n + 1, dtype=D))
        errs.append(rel(sol[-1], ref[-1]))
    assert 12 < errs[0] / errs[1] < 20, errs
