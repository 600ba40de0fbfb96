"""Exact Hessian-vector products: the directional (matrix-free) form of Theorem 1.

Contract eq. 9 with a direction ``v`` of θ. Along the tangent ``δx(t) = (∂x(t)/∂θ) v``,

    δa(t) := Q_xx(t) δx(t) + Q_xu(t) v,        η(t) := Q_ux(t) δx(t) + Q_uu(t) v,

and eq. 9b/9c turn into vector ODEs (``H = aᵀF``, ``s = -t``)::

    forward (t0 → t1):  dx/dt = F,   dδx/dt = F_x δx + F_u v            (tangent-linear)
    backward (s):       dx/ds = -F,  dδx/ds = -(F_x δx + F_u v)
                        da/ds = F_xᵀa,            dμ/ds = F_uᵀa          (9a)
                        dδa/ds = F_xᵀδa + H_xx δx + H_xu v              (9b · (δx, v))
                        dη/ds  = F_uᵀδa + H_ux δx + H_uu v              (9c · (δx, v))

with ``δa`` jumping by ``Σ_j L_kj δx_j`` at each output point ``t_k`` (``a`` by ``∂L/∂x_k``).
Since ``δx(t0) = 0``, ``η(t0) = Q_uu(t0) v = L_θθ v`` exactly, and ``μ(t0)`` is the gradient.

Why this form and not forward-over-adjoint: it is the same Theorem 1 the dense
:func:`~torchdyn_snopt.second_order.hessian` integrates, so both agree to the solver
tolerance, and it is cheap in PyTorch: all four backward right-hand sides come from one
double vector-Jacobian product of ``S = (F_xᵀa)·δx + (F_uᵀa)·v + F·δa`` w.r.t. ``(x, θ, a)``
(``∂S/∂a`` is the tangent ``F_x δx + F_u v``). The forward tangent uses forward-mode AD. Memory
is ``O(M + n)``: nothing is stored per step, only ``x, δx`` at the ``t_span`` points. With
``node.seminorm`` the backward step control measures ``[x, δx, a, δa]`` only (``μ, η`` feed
nothing back), as the node's own adjoint does with ``[x, a]``.

Parameters outside the ODE (a feature extractor producing ``x0``, a head inside ``loss_fn``)
can be included through ``params``: ``x0``'s graph gives ``δx0`` (forward) and receives
``(a(t0), δa(t0))`` (backward), ``loss_fn``'s graph gives its own second-order terms, so the
product is the exact Hessian of the whole model times ``v``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.func import functional_call, jvp
from torchdyn.core.problems import ODEProblem

from torchdyn_snopt.integrate import integrate
from torchdyn_snopt.second_order._problem import (
    LossFn,
    Problem,
    backward_solve,
    problem_of,
    scalar_loss,
)


def hvp(
    node: ODEProblem,
    x0: Tensor,
    loss_fn: LossFn,
    v: Tensor | Sequence[Tensor],
    t_span: Tensor | None = None,
    *,
    params: Sequence[Tensor] | None = None,
    return_grad: bool = False,
) -> Tensor | tuple[Tensor, ...] | tuple:
    """Exact ``L_θθ v`` (and ``∂L/∂θ``) with memory flat in the number of solver steps.

    Args:
        node: a torchdyn ``NeuralODE`` (solvers and tolerances as in :func:`hessian`).
        x0: initial state; may carry a graph to parameters listed in ``params``.
        loss_fn: maps the trajectory ``(len(t_span), *x0.shape)`` to a scalar; may use
            parameters listed in ``params``.
        v: the direction: a flat tensor of all parameters' entries, or tensors shaped like
            ``params``.
        t_span: strictly increasing times; default ``node.t_span`` or ``[0, 1]``.
        params: the parameters θ the Hessian is taken over; default the trainable parameters of
            ``node.vf``. Any tensor that ``x0``, ``loss_fn`` or the field depend on works.
        return_grad: also return the gradient (and the loss) from the same solves.

    Returns:
        ``L_θθ v`` shaped like ``v``; with ``return_grad`` the triple ``(hv, grad, loss)``.
    """
    fn = "hvp"
    problem = problem_of(node, x0, t_span, fn)
    if not callable(loss_fn):
        raise TypeError(f"{fn}: loss_fn={loss_fn!r} is invalid; accepted: a callable")
    params = tuple(problem.params if params is None else params)
    if not params or not all(isinstance(p, Tensor) for p in params):
        raise TypeError(f"{fn}: params={params!r:.80} is invalid; accepted: tensors")
    flat = isinstance(v, Tensor)
    vs = _directions(v, params, fn)

    # θ entries that the field uses, by identity: they ride in the ODE state.
    in_field = [next((i for i, q in enumerate(params) if q is p), None) for p in problem.params]
    v_field = [
        vs[i] if i is not None else torch.zeros_like(p) for i, p in zip(in_field, problem.params)
    ]

    # δx0: forward-mode tangent of x0's own graph (double-VJP trick), zero if x0 is a leaf.
    dx0 = _graph_jvp(x0, params, vs)
    sol, dsol = _forward(problem, x0.detach(), dx0, v_field)

    # Loss: gradient and its derivative along (δsol, v) (the jumps of a and δa).
    with torch.enable_grad():
        s = sol.detach().requires_grad_(True)
        loss = scalar_loss(loss_fn, s, fn)
        g_all = torch.autograd.grad(loss, (s, *params), create_graph=True, allow_unused=True)
        g_sol, g_par_raw = g_all[0], g_all[1:]
        direc = _dot([g_sol], [dsol]) + _dot(g_par_raw, vs)
        h_all = _grad_or_zero(direc, (s, *params))
    h_sol, h_par = h_all[0], list(h_all[1:])
    g_par = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(g_par_raw, params)]

    a0, da0, mu, eta = _backward(problem, sol, dsol, g_sol.detach(), h_sol, v_field)

    # θ in the field: μ(t0) and η(t0) (eq. 9a, 9c).
    mus, etas = _split(mu, problem.params), _split(eta, problem.params)
    for i, m_, e_ in zip(in_field, mus, etas):
        if i is not None:
            g_par[i] = g_par[i] + m_
            h_par[i] = h_par[i] + e_
    # θ upstream of x0: chain (a(t0), δa(t0)) through x0's graph.
    if x0.requires_grad:
        with torch.enable_grad():
            up = torch.autograd.grad(x0, params, a0, create_graph=True, allow_unused=True)
            direc = _dot(up, vs) + _dot([x0], [da0])
            h_up = _grad_or_zero(direc, params)
        for i, (g, h) in enumerate(zip(up, h_up)):
            if g is not None:
                g_par[i] = g_par[i] + g.detach()
            h_par[i] = h_par[i] + h
    hv = _pack(h_par, flat)
    if return_grad:
        return hv, _pack(g_par, flat), loss.detach()
    return hv


def _directions(v: Tensor | Sequence[Tensor], params: tuple[Tensor, ...], fn: str) -> list:
    n = sum(p.numel() for p in params)
    if isinstance(v, Tensor):
        if v.numel() != n:
            raise ValueError(
                f"{fn}: v has {v.numel()} entries; accepted: {n} (one per parameter entry) "
                "or tensors shaped like params"
            )
        return list(_split(v.reshape(-1).to(params[0]), params))
    vs = list(v)
    if len(vs) != len(params) or any(
        not isinstance(a, Tensor) or a.shape != p.shape for a, p in zip(vs, params)
    ):
        raise ValueError(
            f"{fn}: v={[tuple(getattr(a, 'shape', ())) for a in vs]} does not match "
            f"params {[tuple(p.shape) for p in params]}; accepted: same shapes or a flat tensor"
        )
    return [a.detach().to(p) for a, p in zip(vs, params)]


def _split(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    return [c.reshape(p.shape) for c, p in zip(vec.split([p.numel() for p in like]), like)]


def _pack(parts: list[Tensor], flat: bool) -> Tensor | tuple[Tensor, ...]:
    parts = [p.detach() for p in parts]
    return torch.cat([p.reshape(-1) for p in parts]) if flat else tuple(parts)


def _dot(a: Sequence[Tensor | None], b: Sequence[Tensor]) -> Tensor:
    terms = [(x * y).sum() for x, y in zip(a, b) if x is not None]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _grad_or_zero(out: Tensor, inputs: Sequence[Tensor]) -> list[Tensor]:
    if not out.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    gs = torch.autograd.grad(out, inputs, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(gs, inputs)]


def _graph_jvp(x0: Tensor, params: tuple[Tensor, ...], vs: list[Tensor]) -> Tensor:
    """``(∂x0/∂θ) v`` through x0's existing graph (zero when x0 has none)."""
    if not x0.requires_grad:
        return torch.zeros_like(x0)
    with torch.enable_grad():
        w = torch.zeros_like(x0, requires_grad=True)
        gw = torch.autograd.grad(x0, params, w, create_graph=True, allow_unused=True)
        out = _dot(gw, vs)
        if not out.requires_grad:
            return torch.zeros_like(x0)
        (dx0,) = torch.autograd.grad(out, w, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x0) if dx0 is None else dx0.detach()


def _field_jvp(problem: Problem, shape: torch.Size, v_field: list[Tensor]):
    """``(t, x, δx) -> (F, F_x δx + F_u v)`` by forward-mode AD."""
    vf, names, params = problem.vf, problem.names, problem.params

    def call(t: Tensor, x: Tensor, dx: Tensor) -> tuple[Tensor, Tensor]:
        def f(x_: Tensor, *ps: Tensor) -> Tensor:
            return functional_call(vf, dict(zip(names, ps)), (t, x_))

        return cast(tuple[Tensor, Tensor], jvp(f, (x, *params), (dx, *v_field)))

    return call


def _forward(
    problem: Problem, x0: Tensor, dx0: Tensor, v_field: list[Tensor]
) -> tuple[Tensor, Tensor]:
    """``x`` and ``δx`` at every ``t_span`` point; steps controlled on ``x`` only (semi-norm),
    so the forward steps are the plain forward solve's."""
    shape, m = x0.shape, x0.numel()
    tangent = _field_jvp(problem, shape, v_field)

    def f(t: Tensor, y: Tensor) -> Tensor:
        out, dout = tangent(t, y[:m].reshape(shape), y[m:].reshape(shape))
        return torch.cat([out.reshape(-1), dout.reshape(-1)])

    y = torch.cat([x0.reshape(-1), dx0.reshape(-1)])
    xs, dxs = [x0], [dx0]
    with torch.no_grad():
        for t_lo, t_hi in zip(problem.t_span[:-1], problem.t_span[1:]):
            y = integrate(f, y, t_lo, t_hi, problem.solver, problem.atol, problem.rtol, m)
            xs.append(y[:m].reshape(shape))
            dxs.append(y[m:].reshape(shape))
    return torch.stack(xs), torch.stack(dxs)


def _backward(
    problem: Problem,
    sol: Tensor,
    dsol: Tensor,
    g_sol: Tensor,
    h_sol: Tensor,
    v_field: list[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    shape, m, n = sol[0].shape, sol[0].numel(), problem.n_params
    vf, params = problem.vf, problem.params

    def dynamics(t: Tensor, y: Tensor) -> Tensor:
        x, dx, a, da = (c.reshape(shape) for c in y[: 4 * m].split(m))
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            a_ = a.detach().requires_grad_(True)
            f = vf(t, x_)
            first = torch.autograd.grad(f, (x_, *params), a_, create_graph=True, allow_unused=True)
            # S = (F_xᵀa)·δx + (F_uᵀa)·v + F·δa; its gradient holds all four right-hand sides.
            s = _dot(first, [dx, *v_field]) + (f * da).sum()
            sx, *su, sa = _grad_or_zero(s, (x_, *params, a_))
        fu = [torch.zeros_like(p) if g is None else g for g, p in zip(first[1:], params)]
        return torch.cat(
            [
                -f.detach().reshape(-1),
                -sa.reshape(-1),  # tangent, integrated backward
                first[0].detach().reshape(-1),  # eq. 9a
                sx.reshape(-1),  # eq. 9b · (δx, v)
                *(g.detach().reshape(-1) for g in fu),  # eq. 9a
                *(g.reshape(-1) for g in su),  # eq. 9c · (δx, v)
            ]
        )

    opts: dict[str, Any] = {"dtype": sol.dtype, "device": sol.device}
    x, dx = sol[-1].reshape(-1), dsol[-1].reshape(-1)
    a, da = torch.zeros(m, **opts), torch.zeros(m, **opts)
    mu, eta = torch.zeros(n, **opts), torch.zeros(n, **opts)
    for k in range(len(sol) - 1, -1, -1):
        a = a + g_sol[k].reshape(-1)
        da = da + h_sol[k].reshape(-1)
        if k == 0:
            break
        y = torch.cat([x, dx, a, da, mu, eta])
        y = backward_solve(problem, dynamics, y, k, 4 * m if problem.seminorm else None)
        x, dx, a, da, mu, eta = y.split([m, m, m, m, n, n])
    return a.reshape(shape), da.reshape(shape), mu, eta
