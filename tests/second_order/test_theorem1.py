"""Theorem 1 (eq. 9, 10): the dense backward solve against autograd through the solve."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torchdyn.core import NeuralODE

from tests.helpers.data import mlp_data
from tests.helpers.gradients import assert_close, cross_loss, last_loss
from tests.helpers.models import make_node, mlp_field
from tests.helpers.numerics import DTYPE
from tests.helpers.reference import (
    SECOND_ORDER_CASES,
    SECOND_ORDER_REL,
    T_SPAN_2,
    T_SPAN_4,
    autograd_hessian,
    autograd_loss,
)
from torchdyn_snopt.second_order import dense_bytes, hessian

REL, T2, T4 = SECOND_ORDER_REL, T_SPAN_2, T_SPAN_4

CASES = SECOND_ORDER_CASES


@pytest.mark.parametrize("case", list(CASES))
def test_hessian_and_blocks_match_autograd(case):
    field_fn, data_fn, loss_fn, t_span = CASES[case]
    node, x0 = make_node(field_fn(), "autograd"), data_fn()
    ref = autograd_hessian(node, x0, loss_fn, t_span)
    m = x0.numel()
    out = hessian(node, x0, loss_fn, t_span, return_blocks=True)
    assert_close(out.uu, ref[m:, m:], REL)
    assert_close(out.xx, ref[:m, :m], REL)
    assert_close(out.xu, ref[:m, m:], REL)
    theta = [p.detach() for p in node.vf.parameters()]
    x = x0.clone().requires_grad_(True)
    loss = autograd_loss(node, x0, loss_fn, t_span)(x, *[p.requires_grad_() for p in theta])
    grads = torch.autograd.grad(loss, [x, *theta])
    assert_close(out.grad, torch.cat([g.reshape(-1) for g in grads[1:]]), REL)
    assert_close(out.grad_x0, grads[0], REL)
    loss = float(loss.detach())
    assert abs(float(out.loss) - loss) <= REL * abs(loss)


def test_hessian_is_symmetric():
    node, x0 = make_node(mlp_field(3, 6), "autograd"), mlp_data(2, 3)
    h = hessian(node, x0, cross_loss, T4)
    assert h.shape == (sum(p.numel() for p in node.vf.parameters()),) * 2
    assert float((h - h.T).abs().max()) <= 1e-12 * float(h.abs().max())


def test_other_adaptive_solver_and_fixed_step_solver():
    # tsit5 at tight tolerances; rk4 on 41 points converges to the same Hessian (h⁴ error).
    x0 = mlp_data(2, 3)
    ref = hessian(make_node(mlp_field(3, 6), "autograd", "dopri5"), x0, last_loss, T2)
    tsit5 = hessian(make_node(mlp_field(3, 6), "autograd", "tsit5"), x0, last_loss, T2)
    assert_close(tsit5, ref, REL)
    grid = torch.linspace(0.0, 1.0, 41, dtype=DTYPE)
    rk4 = hessian(make_node(mlp_field(3, 6), "autograd", "rk4"), x0, last_loss, grid)
    assert_close(rk4, ref, 1e-6)


def test_float32_close_to_float64():
    ref = hessian(make_node(mlp_field(3, 6), "autograd"), mlp_data(2, 3), last_loss, T2)
    field = mlp_field(3, 6).float()
    node = NeuralODE(
        field, solver="dopri5", atol=1e-6, rtol=1e-6, atol_adjoint=1e-6, rtol_adjoint=1e-6
    )
    h = hessian(node, mlp_data(2, 3).float(), last_loss, T2.float())
    assert h.dtype == torch.float32
    assert_close(h.double(), ref, 1e-4)


def test_without_field_curvature_is_gauss_newton():
    """``field_curvature=False`` = eq. 9 as printed = Jᵀ Φ_xx J with J = ∂x(t1)/∂θ."""
    node, x0 = make_node(mlp_field(3, 6), "autograd"), mlp_data(2, 3)

    def phi(z):
        return torch.logsumexp(z, -1).sum() + (z**2).sum()

    h = hessian(node, x0, lambda sol: phi(sol[-1]), T2, field_curvature=False)
    theta = tuple(p.detach() for p in node.vf.parameters())
    sizes = [p.numel() for p in theta]

    def x1_of(*q):
        return autograd_loss(node, x0, lambda sol: sol[-1], T2)(x0, *q)

    jac = torch.cat(
        [j.reshape(x0.numel(), -1) for j in torch.autograd.functional.jacobian(x1_of, theta)], 1
    )
    x1 = x1_of(*theta).detach()
    phi_xx = torch.autograd.functional.hessian(lambda z: phi(z.reshape(x1.shape)), x1.reshape(-1))
    assert jac.shape == (x0.numel(), sum(sizes))
    assert_close(h, jac.T @ phi_xx @ jac, REL)
    full = hessian(node, x0, lambda sol: phi(sol[-1]), T2)
    assert float((full - h).norm()) > 1e-3 * float(full.norm())  # the H terms matter here


def test_bad_arguments():
    node, x0 = make_node(mlp_field(3, 6), "autograd"), mlp_data(2, 3)
    n = sum(p.numel() for p in node.vf.parameters())
    with pytest.raises(ValueError, match="hvp"):
        hessian(node, x0, last_loss, T2, max_bytes=dense_bytes(x0.numel(), n, 8) - 1)
    with pytest.raises(TypeError, match="node="):
        hessian(nn.Linear(3, 3), x0, last_loss, T2)
    with pytest.raises(ValueError, match="t_span="):
        hessian(node, x0, last_loss, T2.flip(0))
    with pytest.raises(ValueError, match="loss_fn returned"):
        hessian(node, x0, lambda sol: sol[-1], T2)
    with pytest.raises(TypeError, match="loss_fn="):
        hessian(node, x0, "mse", T2)
    with pytest.raises(ValueError, match="x0.dtype"):
        hessian(node, x0.float(), last_loss, T2)
    reg = make_node(mlp_field(3, 6), "autograd", integral_loss=lambda t, x: (x**2).sum())
    with pytest.raises(ValueError, match="integral_loss"):
        hessian(reg, x0, last_loss, T2)
