"""Matrix-free Hessian-vector products (directional Theorem 1) against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.helpers.data import mlp_data
from tests.helpers.gradients import assert_close, cross_loss, last_loss
from tests.helpers.models import make_node, mlp_field
from tests.helpers.numerics import DTYPE, seeded
from tests.helpers.reference import (
    SECOND_ORDER_CASES,
    SECOND_ORDER_REL,
    T_SPAN_2,
    T_SPAN_4,
    autograd_hessian,
    dense_blocks,
)
from torchdyn_snopt.second_order import hessian, hvp

REL, T2, T4 = SECOND_ORDER_REL, T_SPAN_2, T_SPAN_4

CASES = {k: c for k, c in SECOND_ORDER_CASES.items() if k != "mlp-every-point"}


def _direction(n: int) -> torch.Tensor:
    seeded(7)
    return torch.randn(n, dtype=DTYPE)


@pytest.mark.parametrize("case", list(CASES))
def test_hvp_matches_autograd(case):
    field_fn, data_fn, loss_fn, t_span = CASES[case]
    node, x0 = make_node(field_fn(), "autograd"), data_fn()
    m = x0.numel()
    ref = autograd_hessian(node, x0, loss_fn, t_span)[m:, m:]
    v = _direction(len(ref))
    assert_close(hvp(node, x0, loss_fn, v, t_span), ref @ v, REL)


def test_hvp_equals_dense_theorem1_and_returns_gradient():
    node, x0 = make_node(mlp_field(3, 6), "autograd"), mlp_data(2, 3)
    blocks = hessian(node, x0, cross_loss, T4, return_blocks=True)
    v = _direction(len(blocks.uu))
    hv, g, loss = hvp(node, x0, cross_loss, v, T4, return_grad=True)
    assert_close(hv, blocks.uu @ v, REL)
    assert_close(g, blocks.grad, REL)
    assert abs(float(loss) - float(blocks.loss)) <= REL * abs(float(loss))
    # tensors shaped like the parameters in, the same shapes out
    params = list(node.vf.parameters())
    parts = hvp(
        node,
        x0,
        cross_loss,
        [c.reshape(p.shape) for c, p in zip(v.split([p.numel() for p in params]), params)],
        T4,
    )
    assert [tuple(p.shape) for p in parts] == [tuple(p.shape) for p in params]
    assert_close(torch.cat([p.reshape(-1) for p in parts]), hv, 1e-12)


def test_whole_model_hvp_with_parameters_around_the_ode():
    """Encoder → ODE → head: the product over all parameters is the whole model's Hessian."""
    seeded(3)
    enc, head = nn.Linear(4, 3).to(DTYPE), nn.Linear(3, 2).to(DTYPE)
    node = make_node(mlp_field(3, 6), "autograd")
    inputs, labels = torch.randn(5, 4, dtype=DTYPE), torch.tensor([0, 1, 1, 0, 1])
    params = [*enc.parameters(), *node.vf.parameters(), *head.parameters()]
    names = [f"p{i}" for i in range(len(params))]

    def loss_fn(sol):
        return F.cross_entropy(head(sol[-1]), labels)

    def total(*ps):
        from torch.func import functional_call

        e, v_, h = ps[:2], ps[2:-2], ps[-2:]
        z = torch.tanh(F.linear(inputs, *e))
        f_names = [n for n, _ in node.vf.named_parameters()]

        def f(t, x):
            return functional_call(node.vf, dict(zip(f_names, v_)), (t, x))

        from torchdyn.numerics.odeint import odeint

        _, sol = odeint(f, z, T2, node.solver, node.atol, node.rtol)
        return F.cross_entropy(F.linear(sol[-1], *h), labels)

    assert len(names) == 8
    sizes = [p.numel() for p in params]
    ref = dense_blocks(
        torch.autograd.functional.hessian(total, tuple(p.detach() for p in params)), sizes
    )
    v = _direction(sum(sizes))
    x0 = torch.tanh(enc(inputs))
    hv, g, _ = hvp(node, x0, loss_fn, v, T2, params=params, return_grad=True)
    assert_close(hv, ref @ v, REL)
    ref_g = torch.autograd.grad(total(*params), params)
    assert_close(g, torch.cat([q.reshape(-1) for q in ref_g]), REL)


def test_bad_arguments():
    node, x0 = make_node(mlp_field(3, 6), "autograd"), mlp_data(2, 3)
    n = sum(p.numel() for p in node.vf.parameters())
    with pytest.raises(ValueError, match="entries"):
        hvp(node, x0, last_loss, torch.ones(n + 1, dtype=DTYPE), T2)
    with pytest.raises(ValueError, match="does not match"):
        hvp(node, x0, last_loss, [torch.ones(2, dtype=DTYPE)], T2)
    with pytest.raises(TypeError, match="params="):
        hvp(node, x0, last_loss, torch.ones(n, dtype=DTYPE), T2, params=["w"])
    with pytest.raises(ValueError, match="loss_fn returned"):
        hvp(node, x0, lambda sol: sol, torch.ones(n, dtype=DTYPE), T2)
    with pytest.raises(ValueError, match="t_span="):
        hvp(node, x0, last_loss, torch.ones(n, dtype=DTYPE), torch.zeros(2, dtype=DTYPE))
