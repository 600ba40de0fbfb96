"""Theorem 1: every first- and second-order derivative in one backward solve (eq. 9, 10).

The augmented state integrated from ``t_span[-1]`` back to ``t_span[0]`` is::

    [ x | a = Q_x | μ = Q_u | Q_xx | Q_xu | Q_uu | C_j, D_j for pending output points j ]

With the Hamiltonian ``H(t, x, θ) = aᵀF(t, x, θ)`` and ``s = -t``::

    dx/ds    = -F                       da/ds   = F_xᵀ a        dμ/ds = F_uᵀ a          (9a)
    dQ_xx/ds = F_xᵀQ_xx + Q_xxF_x + H_xx                                               (9b)
    dQ_xu/ds = Q_xxF_u + F_xᵀQ_xu + H_xu                                               (9b)
    dQ_uu/ds = F_uᵀQ_xu + Q_uxF_u + H_uu                                               (9c)

The ``H_··`` terms (second derivatives of the field contracted with the adjoint) come out of
the paper's proof (Appendix A.2) but are not printed in eq. 9; without them
(``field_curvature=False``) the result is eq. 9 as printed, i.e. the generalized Gauss-Newton
matrix ``Jᵀ Φ_xx J`` with ``J = ∂x(t1)/∂θ``, which is what Proposition 2 factorizes.

A loss over several ``t_span`` points ``L(x_0, …, x_K)`` is exact too: at each point ``t_k``
(reached backward) ``a += ∂L/∂x_k`` and ``Q_xx += L_kk``; a cross term ``L_kj`` (j < k) rides
along as ``C_j = ∂²Q/∂x∂x_j`` (``dC_j/ds = F_xᵀC_j``) and ``D_j = ∂²Q/∂θ∂x_j``
(``dD_j/ds = F_uᵀC_j``) until ``t_j``, where ``Q_xx += C_j + C_jᵀ`` and ``Q_xu += D_jᵀ``
(the state ``x_j`` is a frozen copy of ``x`` that merges back into it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchdyn.core.problems import ODEProblem

from torchdyn_snopt.second_order._problem import (
    LossFn,
    Problem,
    backward_solve,
    forward_solve,
    loss_derivatives,
    problem_of,
)

#: Default memory ceiling of :func:`hessian` (bytes of dense second-order state).
MAX_BYTES: int = 2**30
#: Copies of the dense state a Runge-Kutta step holds (stages, error, new state; dopri5: 7 + 3).
_STATE_COPIES = 10


@dataclass(frozen=True)
class SecondOrder:
    """All derivatives at ``t_span[0]`` from one backward solve of eq. 10.

    ``M = x0.numel()``, ``n`` = number of trainable parameters of ``node.vf`` (θ, flattened
    in ``vf.parameters()`` order).
    """

    loss: Tensor  #: ``L`` (scalar)
    grad: Tensor  #: ``Q_u(t0) = ∂L/∂θ``, shape ``(n,)``
    grad_x0: Tensor  #: ``Q_x(t0) = a(t0) = ∂L/∂x0``, shape of ``x0``
    uu: Tensor  #: ``Q_uu(t0) = L_θθ``, ``(n, n)``
    xx: Tensor  #: ``Q_xx(t0) = ∂²L/∂x0²``, ``(M, M)``
    xu: Tensor  #: ``Q_xu(t0) = ∂²L/∂x0∂θ``, ``(M, n)``


def dense_bytes(n_state: int, n_params: int, itemsize: int) -> int:
    """Bytes of the dense eq.-10 state (and the ``H`` Hessian) over a Runge-Kutta step."""
    return _STATE_COPIES * itemsize * (n_state + n_params) ** 2


def hessian(
    node: ODEProblem,
    x0: Tensor,
    loss_fn: LossFn,
    t_span: Tensor | None = None,
    *,
    return_blocks: bool = False,
    field_curvature: bool = True,
    max_bytes: int = MAX_BYTES,
) -> Tensor | SecondOrder:
    """Exact ``L_θθ = Q_uu(t0)`` of ``L = loss_fn(trajectory)`` by one backward solve (eq. 10).

    Args:
        node: a torchdyn ``NeuralODE``; θ are its field's trainable parameters. Forward solve:
            ``node.solver`` at ``atol``/``rtol``; backward: ``node.solver_adjoint`` at
            ``atol_adjoint``/``rtol_adjoint`` (any torchdyn solver, float32 or float64).
        x0: initial state, any shape (batch included), treated as a constant.
        loss_fn: maps the trajectory ``(len(t_span), *x0.shape)`` to a scalar; e.g. a terminal
            loss ``lambda sol: ce(head(sol[-1]), y)``. Any dependence on several points works.
        t_span: strictly increasing times; default ``node.t_span`` or ``[0, 1]``.
        return_blocks: return a :class:`SecondOrder` (loss, gradients, ``Q_xx``, ``Q_xu``,
            ``Q_uu`` at ``t0``) instead of the ``(n, n)`` matrix alone.
        field_curvature: include ``H_xx, H_xu, H_uu`` (exact Hessian, default); ``False`` gives
            eq. 9 as printed, the generalized Gauss-Newton matrix (see module docstring).
        max_bytes: refuse problems whose dense state needs more (:func:`dense_bytes`).

    Cost: memory ``O((M + n)²)`` independent of the number of solver steps; per field
    evaluation ``≈ 2(M + n)`` batched vector-Jacobian products. For large models use
    :func:`torchdyn_snopt.second_order.hvp`.
    """
    fn = "hessian"
    problem = problem_of(node, x0, t_span, fn)
    if not callable(loss_fn):
        raise TypeError(f"{fn}: loss_fn={loss_fn!r} is invalid; accepted: a callable")
    n_state, n = x0.numel(), problem.n_params
    need = dense_bytes(n_state, n, x0.element_size())
    if need > max_bytes:
        raise ValueError(
            f"{fn}: the dense state of eq. 10 needs about {need / 2**30:.2f} GiB for n={n} "
            f"parameters and M={n_state} state entries, above max_bytes={max_bytes}; use "
            "torchdyn_snopt.second_order.hvp(node, x0, loss_fn, v) for exact Hessian-vector "
            "products at O(M + n) memory, or raise max_bytes"
        )
    sol = forward_solve(problem, x0)
    loss, g_sol = loss_derivatives(loss_fn, sol, fn)
    blocks = _backward(problem, loss_fn, sol, g_sol, field_curvature)
    result = SecondOrder(loss, *blocks)
    return result if return_blocks else result.uu


def loss_hessian_row(loss_fn: LossFn, sol: Tensor, k: int) -> Tensor | None:
    """``∂²L/∂x_k∂x_j`` for all ``j``, shape ``(T, M, M)`` (index ``[j, row, col]``), or
    ``None`` when ``L`` does not depend on ``x_k`` at all (checked exactly: zero gradient and a
    zero product with a random direction)."""
    n_state = sol[0].numel()
    with torch.enable_grad():
        s = sol.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(s).reshape(()), s, create_graph=True)
        gk = g[k].reshape(-1)
        if not gk.requires_grad:  # L is linear in x_k (or does not use it)
            return None
        probe = torch.randn(n_state, dtype=sol.dtype, device=sol.device)
        (hp,) = torch.autograd.grad(gk, s, probe, retain_graph=True, allow_unused=True)
        if (hp is None or not bool(hp.any())) and not bool(gk.detach().any()):
            return None
        eye = torch.eye(n_state, dtype=sol.dtype, device=sol.device)
        (rows,) = torch.autograd.grad(gk, s, eye, is_grads_batched=True, allow_unused=True)
    if rows is None:
        return None
    return rows.reshape(n_state, len(sol), n_state).transpose(0, 1)  # [j, row, col]


def _backward(
    problem: Problem, loss_fn: LossFn, sol: Tensor, g_sol: Tensor, field_curvature: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    shape, n_state, n = sol[0].shape, sol[0].numel(), problem.n_params
    opts: dict[str, Any] = {"dtype": sol.dtype, "device": sol.device}
    x = sol[-1].reshape(-1)
    a = torch.zeros(n_state, **opts)
    mu = torch.zeros(n, **opts)
    qxx = torch.zeros(n_state, n_state, **opts)
    qxu = torch.zeros(n_state, n, **opts)
    quu = torch.zeros(n, n, **opts)
    cross: dict[int, tuple[Tensor, Tensor]] = {}  # pending j -> (C_j (M, M), D_j (n, M))
    last = len(sol) - 1
    for k in range(last, -1, -1):
        # Output point t_k joins: x_k is the current x (gradient jump, eq. 9 terminal terms).
        a = a + g_sol[k].reshape(-1)
        row = loss_hessian_row(loss_fn, sol, k)
        if row is not None:
            qxx = qxx + row[k]
        if k in cross:
            c, d = cross.pop(k)
            qxx = qxx + c + c.T
            qxu = qxu + d.T
        if row is not None:
            for j in range(k):
                if bool(row[j].any()):  # C_j = ∂²Q/∂x∂x_j starts at L_kj (rows: x_k)
                    c, d = cross.get(j, (torch.zeros_like(qxx), torch.zeros(n, n_state, **opts)))
                    cross[j] = (c + row[j], d)
        if k == 0:
            break
        order = sorted(cross)
        y = torch.cat(
            [x, a, mu, qxx.reshape(-1), qxu.reshape(-1), quu.reshape(-1)]
            + [cross[j][0].reshape(-1) for j in order]
            + [cross[j][1].reshape(-1) for j in order]
        )
        dyn = _dynamics(problem, shape, len(order), field_curvature)
        y = backward_solve(problem, dyn, y, k)
        x, a, mu, qxx, qxu, quu, cs, ds = _unpack(y, n_state, n, len(order))
        cross = {j: (c, d) for j, c, d in zip(order, cs, ds)}
    return mu, a.reshape(shape), quu, qxx, qxu


def _unpack(
    y: Tensor, m: int, n: int, p: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    sizes = [m, m, n, m * m, m * n, n * n] + [m * m] * p + [n * m] * p
    parts = y.split(sizes)
    x, a, mu = parts[:3]
    qxx, qxu, quu = parts[3].reshape(m, m), parts[4].reshape(m, n), parts[5].reshape(n, n)
    cs = [c.reshape(m, m) for c in parts[6 : 6 + p]]
    ds = [d.reshape(n, m) for d in parts[6 + p :]]
    return x, a, mu, qxx, qxu, quu, cs, ds


def _dynamics(problem: Problem, shape: torch.Size, p: int, field_curvature: bool):
    vf, params = problem.vf, problem.params
    m, n = shape.numel(), problem.n_params

    def dynamics(t: Tensor, y: Tensor) -> Tensor:
        x, a, _, qxx, qxu, _, cs, _ = _unpack(y, m, n, p)
        # Columns pushed through [F_x; F_u]ᵀ in one batched VJP: a, Q_xx, Q_xu, C_j.
        cols = torch.cat([a[None], qxx.T, qxu.T, *(c.T for c in cs)])
        with torch.enable_grad():
            x_ = x.detach().reshape(shape).requires_grad_(True)
            f = vf(t, x_)
            out = torch.autograd.grad(
                f,
                (x_, *params),
                cols.reshape(len(cols), *shape),
                is_grads_batched=True,
                allow_unused=True,
                retain_graph=field_curvature,
            )
            vx = _batched(out[:1], (x_,), len(cols))
            vu = _batched(out[1:], params, len(cols))
            h = _hamiltonian_hessian(f, x_, params, a, m) if field_curvature else None
        s_xx = vx[1 : m + 1].T  # F_xᵀ Q_xx
        u_xx = vu[1 : m + 1].T  # F_uᵀ Q_xx   (n, M)
        s_xu = vx[m + 1 : m + n + 1].T  # F_xᵀ Q_xu (M, n)
        u_xu = vu[m + 1 : m + n + 1].T  # F_uᵀ Q_xu (n, n)
        dqxx = s_xx + s_xx.T  # eq. 9b
        dqxu = u_xx.T + s_xu  # eq. 9b
        dquu = u_xu + u_xu.T  # eq. 9c
        if h is not None:
            dqxx = dqxx + h[0]
            dqxu = dqxu + h[1]
            dquu = dquu + h[2]
        dcs = [vx[m + n + 1 + i * m : m + n + 1 + (i + 1) * m].T for i in range(p)]
        dds = [vu[m + n + 1 + i * m : m + n + 1 + (i + 1) * m].T for i in range(p)]
        return torch.cat(
            [-f.detach().reshape(-1), vx[0], vu[0], dqxx.reshape(-1), dqxu.reshape(-1)]
            + [dquu.reshape(-1)]
            + [c.reshape(-1) for c in dcs]
            + [d.reshape(-1) for d in dds]
        )

    return dynamics


def _batched(out: tuple[Tensor | None, ...], like: tuple[Tensor, ...], k: int) -> Tensor:
    """Batched gradients ``(k, *t.shape)`` per input, ``None`` as zeros, as one ``(k, Σ)``."""
    return torch.cat(
        [
            torch.zeros(k, t.numel(), dtype=t.dtype, device=t.device)
            if g is None
            else g.reshape(k, -1)
            for g, t in zip(out, like)
        ],
        dim=1,
    )


def _hamiltonian_hessian(
    f: Tensor, x: Tensor, params: tuple[Tensor, ...], a: Tensor, m: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(H_xx, H_xu, H_uu)`` of ``H = aᵀF(t, x, θ)``, symmetrized, by one batched double VJP."""
    inputs = (x, *params)
    first = torch.autograd.grad(f, inputs, a.reshape(f.shape), create_graph=True, allow_unused=True)
    sizes = [t.numel() for t in inputs]
    total = sum(sizes)
    eye = torch.eye(total, dtype=f.dtype, device=f.device)
    outputs, cotangents = [], []
    for g, block, t in zip(first, eye.split(sizes, dim=1), inputs):
        if g is not None and g.requires_grad:  # else ∂g/∂(x, θ) = 0
            outputs.append(g)
            cotangents.append(block.reshape(total, *t.shape))
    if outputs:
        rows = torch.autograd.grad(
            outputs, inputs, cotangents, is_grads_batched=True, allow_unused=True
        )
        hess = _batched(rows, inputs, total)
    else:
        hess = torch.zeros(total, total, dtype=f.dtype, device=f.device)
    hess = 0.5 * (hess + hess.T)
    return hess[:m, :m], hess[:m, m:], hess[m:, m:]
