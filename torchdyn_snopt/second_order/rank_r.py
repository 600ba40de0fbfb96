"""Proposition 2: the second-order matrices of eq. 9 from R vector ODEs (eq. 11, 12).

Given a terminal curvature ``Q_xx(t1) = Σ_i y_i y_iᵀ`` (rank R), integrate backward
(``s = -t``)::

    dq_i/ds = F_xᵀ q_i,   q_i(t1) = y_i;      dp_i/ds = F_uᵀ q_i,   p_i(t1) = 0      (11)

so that ``p_i(t0) = ∫ F_uᵀ q_i dt`` and ``Q_xx = Σ q_i q_iᵀ``, ``Q_xu = Σ q_i p_iᵀ``,
``Q_uu(t0) = Σ p_i p_iᵀ`` (12). Eq. 11 prints ``F_uᵀ p_i`` on the right of the p-equation;
substituting the factored forms into eq. 9b/9c shows it must be ``F_uᵀ q_i`` (the integrand
eq. 12 itself uses), which is what is integrated here.

What this equals: Theorem 1 *without* the field-curvature terms ``H_xx, H_xu, H_uu``
(:func:`~torchdyn_snopt.second_order.hessian` with ``field_curvature=False``), i.e. the
generalized Gauss-Newton matrix ``Jᵀ Q_xx(t1) J`` with ``J = ∂x(t1)/∂θ``. It is the full
``L_θθ`` only when the field is affine in ``(x, θ)`` jointly (then ``H ≡ 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchdyn.core.problems import ODEProblem

from torchdyn_snopt.second_order._problem import (
    LossFn,
    backward_solve,
    forward_solve,
    problem_of,
)


@dataclass(frozen=True)
class LowRank:
    """The factors of Proposition 2 at ``t0``: ``q`` is ``(R, *x0.shape)``, ``p`` is ``(R, n)``."""

    q: Tensor
    p: Tensor

    @property
    def uu(self) -> Tensor:
        """``Q_uu(t0) = Σ p_i p_iᵀ`` (eq. 12), ``(n, n)``."""
        return self.p.T @ self.p

    @property
    def xx(self) -> Tensor:
        """``Q_xx(t0) = Σ q_i q_iᵀ``, ``(M, M)``."""
        q = self.q.reshape(len(self.q), -1)
        return q.T @ q

    @property
    def xu(self) -> Tensor:
        """``Q_xu(t0) = Σ q_i p_iᵀ``, ``(M, n)``."""
        return self.q.reshape(len(self.q), -1).T @ self.p


def rank_r(node: ODEProblem, x0: Tensor, factors: Tensor, t_span: Tensor | None = None) -> LowRank:
    """Integrate eq. 11 for the terminal factors ``factors`` (``(R, *x0.shape)``: ``y_i`` with
    ``Q_xx(t_span[-1]) = Σ y_i y_iᵀ``) back to ``t_span[0]``; one forward and one backward
    solve of ``R`` batched vector ODEs, memory ``O(R(M + n))``.
    """
    fn = "rank_r"
    problem = problem_of(node, x0, t_span, fn)
    if not isinstance(factors, Tensor) or factors.shape[1:] != x0.shape or len(factors) < 1:
        raise ValueError(
            f"{fn}: factors has shape {tuple(getattr(factors, 'shape', ()))}; accepted: "
            f"(R, *x0.shape) = (R, {', '.join(map(str, x0.shape))}) with R >= 1"
        )
    shape, m, n, r = x0.shape, x0.numel(), problem.n_params, len(factors)
    vf, params = problem.vf, problem.params

    def dynamics(t: Tensor, y: Tensor) -> Tensor:
        x, q = y[:m].reshape(shape), y[m : m + r * m].reshape(r, *shape)
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            f = vf(t, x_)
            out = torch.autograd.grad(f, (x_, *params), q, is_grads_batched=True, allow_unused=True)
        parts = [
            torch.zeros(r, t_.numel(), dtype=y.dtype, device=y.device)
            if g is None
            else g.reshape(r, -1)
            for g, t_ in zip(out, (x_, *params))
        ]
        dq, dp = parts[0], torch.cat(parts[1:], dim=1)  # eq. 11
        return torch.cat([-f.detach().reshape(-1), dq.reshape(-1), dp.reshape(-1)])

    sol = forward_solve(problem, x0)
    y = torch.cat(
        [
            sol[-1].reshape(-1),
            factors.detach().to(x0).reshape(-1),
            torch.zeros(r * n, dtype=x0.dtype, device=x0.device),
        ]
    )
    for k in range(len(sol) - 1, 0, -1):
        y = backward_solve(problem, dynamics, y, k)
    q = y[m : m + r * m].reshape(r, *shape)
    p = y[m + r * m :].reshape(r, n)
    return LowRank(q, p)


def loss_factors(loss_fn: LossFn, x1: Tensor, rtol: float = 1e-10) -> Tensor:
    """Terminal factors ``y_i`` with ``Φ_xx(x1) = Σ y_i y_iᵀ`` for a loss ``Φ(x1)`` with a
    positive semidefinite Hessian (e.g. softmax cross-entropy of a linear head, squared
    error): ``y_i = sqrt(λ_i) u_i`` over the eigenpairs with ``λ_i > rtol · max|λ|``.

    Raises ``ValueError`` when an eigenvalue is below ``-rtol · max|λ|`` (Proposition 2 needs
    ``Q_xx(t1) ⪰ 0``). Returns ``(R, *x1.shape)``.
    """
    m = x1.numel()
    with torch.enable_grad():
        hess = torch.autograd.functional.hessian(
            lambda z: loss_fn(z.reshape(x1.shape)).reshape(()), x1.detach().reshape(-1)
        )
    lam, vec = torch.linalg.eigh(0.5 * (hess + hess.T))
    scale = float(lam.abs().max()) if m else 0.0
    if scale == 0.0:
        raise ValueError("loss_factors: the loss has a zero Hessian at x1; accepted: Φ_xx ≠ 0")
    if float(lam.min()) < -rtol * scale:
        raise ValueError(
            f"loss_factors: the loss Hessian has eigenvalue {float(lam.min()):.3e} < 0; "
            "accepted: a positive semidefinite Φ_xx (Proposition 2 factors Σ y_i y_iᵀ)"
        )
    keep = lam > rtol * scale
    return (vec[:, keep] * lam[keep].sqrt()).T.reshape(-1, *x1.shape)
