"""Proposition 2 (eq. 11, 12) against Theorem 1 without field curvature, and where exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers.data import mlp_data
from tests.helpers.gradients import assert_close
from tests.helpers.models import make_node, mlp_field
from tests.helpers.numerics import DTYPE, seeded
from tests.helpers.reference import SECOND_ORDER_REL, autograd_hessian
from torchdyn_snopt.second_order import hessian, loss_factors, rank_r
from torchdyn_snopt.second_order._problem import forward_solve, problem_of

REL = SECOND_ORDER_REL

T3 = torch.linspace(0.0, 1.0, 3, dtype=DTYPE)


def _head_loss():
    seeded(5)
    head = nn.Linear(3, 4).to(DTYPE)
    labels = torch.tensor([1, 3])

    def phi(z):
        return F.cross_entropy(head(z), labels)

    return phi


def test_rank_r_equals_theorem1_without_field_curvature():
    node, x0 = make_node(mlp_field(3, 6), "autograd"), mlp_data(2, 3)
    phi = _head_loss()
    sol = forward_solve(problem_of(node, x0, T3, "test"), x0)
    ys = loss_factors(phi, sol[-1])
    assert 1 <= len(ys) <= 6  # cross-entropy over 4 classes: rank ≤ 3 per sample
    low = rank_r(node, x0, ys, T3)
    gn = hessian(node, x0, lambda s: phi(s[-1]), T3, return_blocks=True, field_curvature=False)
    assert_close(low.uu, gn.uu, REL)
    assert_close(low.xx, gn.xx, REL)
    assert_close(low.xu, gn.xu, REL)


class _Affine(nn.Module):
    """``F = W0 x + b`` with only ``b`` trainable: affine in (x, θ) jointly, so H ≡ 0."""

    def __init__(self) -> None:
        super().__init__()
        seeded(2)
        self.register_buffer("w0", 0.5 * torch.randn(3, 3, dtype=DTYPE))
        self.b = nn.Parameter(torch.randn(3, dtype=DTYPE))

    def forward(self, t, x, args=None):
        return x @ self.w0.T + self.b


def test_rank_r_is_the_full_hessian_for_an_affine_field():
    node, x0 = make_node(_Affine(), "autograd"), mlp_data(2, 3)
    target = torch.randn(2, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))

    def phi(z):
        return ((z - target) ** 2).sum() + 0.1 * (z.sum()) ** 2

    sol = forward_solve(problem_of(node, x0, T3, "test"), x0)
    low = rank_r(node, x0, loss_factors(phi, sol[-1]), T3)
    m = x0.numel()
    ref = autograd_hessian(node, x0, lambda s: phi(s[-1]), T3)
    assert_close(low.uu, ref[m:, m:], REL)
    assert_close(hessian(node, x0, lambda s: phi(s[-1]), T3), ref[m:, m:], REL)


def test_bad_arguments():
    node, x0 = make_node(mlp_field(3, 6), "autograd"), mlp_data(2, 3)
    with pytest.raises(ValueError, match="factors has shape"):
        rank_r(node, x0, torch.ones(2, 3, dtype=DTYPE), T3)
    with pytest.raises(ValueError, match="positive semidefinite"):
        loss_factors(lambda z: -(z**2).sum(), x0)
    with pytest.raises(ValueError, match="zero Hessian"):
        loss_factors(lambda z: z.sum(), x0)
