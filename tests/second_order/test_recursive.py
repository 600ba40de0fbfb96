"""The recursive-adjoint baseline (§2): correct in the limit, less accurate than Theorem 1."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.data import mlp_data
from tests.helpers.gradients import assert_close, cross_loss, last_loss, rel_err
from tests.helpers.models import make_node, mlp_field
from tests.helpers.numerics import DTYPE
from tests.helpers.reference import autograd_hessian
from torchdyn_snopt.second_order import (
    hessian,
    recursive_adjoint_hessian,
    recursive_adjoint_odeint,
)

T2 = torch.tensor([0.0, 1.0], dtype=DTYPE)
T4 = torch.linspace(0.0, 1.0, 4, dtype=DTYPE)


def test_torchdyn_adjoint_cannot_be_differentiated_twice():
    """Why the baseline has its own solve: torchdyn's backward frees its graph."""
    node, x0 = make_node(mlp_field(3, 6), "adjoint"), mlp_data(2, 3)
    _, sol = node(x0, T2)
    params = list(node.vf.parameters())
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(last_loss(sol), params, create_graph=True)


def test_recursive_hessian_converges_to_autograd():
    node, x0 = make_node(mlp_field(3, 6), "autograd"), mlp_data(2, 3)
    m = x0.numel()
    ref = autograd_hessian(node, x0, cross_loss, T4)[m:, m:]
    assert_close(recursive_adjoint_hessian(node, x0, cross_loss, T4), ref, 1e-6)


def test_recursive_odeint_third_derivative():
    """Adjoints of adjoints of adjoints: a third directional derivative matches autograd."""
    node, x0 = make_node(mlp_field(3, 6), "autograd"), mlp_data(2, 3)
    v = torch.randn(
        sum(p.numel() for p in node.vf.parameters()),
        dtype=DTYPE,
        generator=torch.Generator().manual_seed(4),
    )

    def third(solve):
        params = list(node.vf.parameters())
        g = torch.autograd.grad(last_loss(solve()), params, create_graph=True)
        g = torch.cat([q.reshape(-1) for q in g])
        h = torch.autograd.grad(g @ v, params, create_graph=True)
        h = torch.cat([q.reshape(-1) for q in h])
        return torch.cat([q.reshape(-1) for q in torch.autograd.grad(h @ v, params)])

    ours = third(lambda: recursive_adjoint_odeint(node, x0, T2))
    ref = third(lambda: node(x0, T2)[1])
    assert_close(ours, ref, 1e-5)


def test_recursive_error_exceeds_theorem1_at_loose_tolerance():
    """Table 1 in small: at dopri5 1e-3 the recursion's Hessian error is the larger one."""
    x0 = mlp_data(4, 3)
    truth_node = make_node(mlp_field(3, 6), "autograd")
    m = x0.numel()
    truth = autograd_hessian(truth_node, x0, last_loss, T2)[m:, m:]
    loose = make_node(mlp_field(3, 6), "autograd", tol=1e-3)
    err_rec = rel_err(recursive_adjoint_hessian(loose, x0, last_loss, T2), truth)
    err_thm = rel_err(hessian(loose, x0, last_loss, T2), truth)
    assert err_thm < err_rec, (err_thm, err_rec)
