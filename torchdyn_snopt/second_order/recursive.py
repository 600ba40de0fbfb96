"""The recursive-adjoint baseline of §2: differentiate the adjoint gradient again.

Chen et al. (2018) note that wrapping the adjoint solve (eq. 5) as ``grad(L, θ)`` lets one get
``∂ⁿL/∂θⁿ = grad(∂ⁿ⁻¹L/∂θⁿ⁻¹, θ)`` recursively. torchdyn's ``"adjoint"`` cannot be used for this:
its backward runs ``torch.autograd.grad`` without ``create_graph`` on a graph it frees, so
``torch.autograd.grad(L, θ, create_graph=True)`` raises ("Trying to backward through the graph
a second time"). :class:`_AdjointSolve` is therefore an ODE solve whose backward is *itself* an
``_AdjointSolve`` of the augmented system ``G`` of eq. 5, with a field that stays
differentiable: double backward re-solves an adjoint of the adjoint system (integrating ``G``
back from ``t0`` to ``t1``), then the first adjoint again for the new terminal cotangent, and so
on for higher orders. Every level re-integrates states in the opposite direction from where
they were computed, which is where the accumulated error of Table 1 comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call
from torchdyn.core.problems import ODEProblem

from torchdyn_snopt.integrate import integrate
from torchdyn_snopt.second_order._problem import LossFn, Problem, problem_of

#: ``field(s, y, params) -> dy/ds`` on flat states.
Field = Callable[[Tensor, Tensor, Sequence[Tensor]], Tensor]
#: ``(solver, atol, rtol)`` of one solve.
Scheme = tuple[torch.nn.Module, float, float]


class _AdjointSolve(torch.autograd.Function):
    """``y(s1)`` of ``dy/ds = field(s, y, θ)`` from ``y(s0)``; backward by the adjoint method,
    recursively differentiable."""

    @staticmethod
    def forward(
        ctx: Any,
        field: Field,
        s0: Tensor,
        s1: Tensor,
        fwd: Scheme,
        adj: Scheme,
        y0: Tensor,
        *params: Tensor,
    ) -> Tensor:
        solver, atol, rtol = fwd
        with torch.no_grad():
            y1 = integrate(
                lambda s, y: field(s, y, params).detach(), y0, s0, s1, solver, atol, rtol
            )
        ctx.field, ctx.span, ctx.adj = field, (s0, s1), adj
        ctx.save_for_backward(y1, *params)
        return y1

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Any, ...]:
        y1, *params = ctx.saved_tensors
        s0, s1 = ctx.span
        y0, lam0, mu0 = adjoint_solve(ctx.field, y1, g, params, s0, s1, ctx.adj)
        return (None, None, None, None, None, lam0, *mu0)


def adjoint_solve(
    field: Field,
    y1: Tensor,
    g: Tensor,
    params: Sequence[Tensor],
    s0: Tensor,
    s1: Tensor,
    adj: Scheme,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Eq. 5 for ``field`` over ``[s0, s1]``: returns ``(y(s0), ∂/∂y(s0), ∂/∂θ)`` given
    ``∂/∂y(s1) = g``. Runs as an :class:`_AdjointSolve` of ``G`` with the scheme ``adj`` (its
    own adjoints too), so it can be differentiated."""
    n_y, sizes = y1.numel(), [p.numel() for p in params]

    def augmented(r: Tensor, big: Tensor, ps: Sequence[Tensor]) -> Tensor:
        # r = -s; G of eq. 5: d[y, λ, μ]/dr = [-field, (∂field/∂y)ᵀλ, (∂field/∂θ)ᵀλ]
        y, lam = big[:n_y], big[n_y : 2 * n_y]
        create = torch.is_grad_enabled()  # True when this G is itself being differentiated
        with torch.enable_grad():
            y_ = y if y.requires_grad else y.detach().requires_grad_(True)
            ps_ = [p if p.requires_grad else p.detach().requires_grad_(True) for p in ps]
            dy = field(-r, y_, ps_)
            vjp = torch.autograd.grad(dy, (y_, *ps_), lam, create_graph=create, allow_unused=True)
        parts = [
            torch.zeros(t.numel(), dtype=big.dtype, device=big.device)
            if v is None
            else v.reshape(-1)
            for v, t in zip(vjp, (y_, *ps_))
        ]
        return torch.cat([-dy.reshape(-1), *parts])

    big1 = torch.cat([y1.reshape(-1), g.reshape(-1), y1.new_zeros(sum(sizes))])
    big0 = _AdjointSolve.apply(augmented, -s1, -s0, adj, adj, big1, *params)
    y0, lam0, mu0 = big0.split([n_y, n_y, sum(sizes)])
    mus = [m.reshape(p.shape) for m, p in zip(mu0.split(sizes), params)]
    return y0, lam0.reshape(y1.shape), mus


def _ode_field(problem: Problem, shape: torch.Size) -> Field:
    vf, names = problem.vf, problem.names

    def field(s: Tensor, y: Tensor, ps: Sequence[Tensor]) -> Tensor:
        out = functional_call(vf, dict(zip(names, ps)), (s, y.reshape(shape)))
        return out.reshape(-1)

    return field


def _solve(problem: Problem, x0: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Trajectory ``(T, *x0.shape)``, differentiable to any order w.r.t. ``x0`` and ``params``:
    forward with ``node.solver``, every adjoint level with ``node.solver_adjoint``."""
    field = _ode_field(problem, x0.shape)
    fwd = (problem.solver, problem.atol, problem.rtol)
    adj = (problem.solver_adjoint, problem.atol_adjoint, problem.rtol_adjoint)
    xs, y = [x0], x0.reshape(-1)
    for t_lo, t_hi in zip(problem.t_span[:-1], problem.t_span[1:]):
        y = _AdjointSolve.apply(field, t_lo, t_hi, fwd, adj, y, *params)
        xs.append(y.reshape(x0.shape))
    return torch.stack(xs)


def recursive_adjoint_odeint(node: ODEProblem, x0: Tensor, t_span: Tensor | None = None) -> Tensor:
    """The trajectory ``(len(t_span), *x0.shape)`` whose gradients come from the adjoint
    method and whose higher derivatives come from adjoints of adjoints (§2)."""
    problem = problem_of(node, x0, t_span, "recursive_adjoint_odeint")
    return _solve(problem, x0, problem.params)


def recursive_adjoint_hessian(
    node: ODEProblem, x0: Tensor, loss_fn: LossFn, t_span: Tensor | None = None
) -> Tensor:
    """``L_θθ`` (``(n, n)``) by ``torch.autograd.functional.hessian`` over the recursive
    adjoint: ``n`` double-backward passes, each re-solving the adjoint of the adjoint system.
    """
    fn = "recursive_adjoint_hessian"
    problem = problem_of(node, x0, t_span, fn)
    if not callable(loss_fn):
        raise TypeError(f"{fn}: loss_fn={loss_fn!r} is invalid; accepted: a callable")
    x0 = x0.detach()

    def loss_of(*ps: Tensor) -> Tensor:
        return loss_fn(_solve(problem, x0, ps)).reshape(())

    params = tuple(p.detach() for p in problem.params)
    blocks = torch.autograd.functional.hessian(loss_of, params)
    n = problem.n_params
    rows = [
        torch.cat([blocks[i][j].reshape(p.numel(), q.numel()) for j, q in enumerate(params)], 1)
        for i, p in enumerate(params)
    ]
    return torch.cat(rows, 0).reshape(n, n)
