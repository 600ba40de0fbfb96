"""Kinetic + Jacobian-norm regularizer (Finlay et al. 2020; the paper's Table 6), float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE
from torchdyn.numerics.odeint import odeint

import torchdyn_snopt  # noqa: F401  (registers the "snopt" sensitivity)
from tests.helpers.data import mlp_data
from tests.helpers.models import conv_field, datacontrol_field, mlp_field
from tests.helpers.numerics import DTYPE, make_solver, seeded, single_thread
from torchdyn_snopt import SNOptPreconditioner
from torchdyn_snopt.adjoint import existing_record, record_of
from torchdyn_snopt.regularization import kinetic_jacobian

TOL = 1e-10


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def linear_node(sensitivity: str = "snopt") -> tuple[NeuralODE, Tensor]:
    seeded()
    W = 0.5 * torch.randn(4, 4, dtype=DTYPE)
    lin = nn.Linear(4, 4, bias=False).to(DTYPE)
    with torch.no_grad():
        lin.weight.copy_(W)
    node = NeuralODE(lin, solver=make_solver("dopri5"), atol=TOL, rtol=TOL, sensitivity=sensitivity)
    return node, W


def closed_form_kinetic(W: Tensor, x0: Tensor, t0: float, t1: float, n: int) -> float:
    """Batch mean of ∫ ‖W e^{W(t - t0)} x0‖² dt by the trapezoid rule on ``n`` points."""
    ts = torch.linspace(t0, t1, n, dtype=DTYPE)
    E = torch.linalg.matrix_exp(W[None] * (ts - t0)[:, None, None])  # (n, d, d)
    F = torch.einsum("ij,njk,bk->nbi", W, E, x0)
    sq = F.pow(2).sum(-1)  # (n, B)
    return float(torch.trapezoid(sq, ts, dim=0).mean())


# --------------------------------------------------------------------------- linear field


def test_linear_exact_matches_closed_form():
    node, W = linear_node()
    x0 = mlp_data(batch=5, dim=4)
    fro2 = float(W.pow(2).sum())
    for n in (33, 129):
        out = kinetic_jacobian(node, x0, t_span=[0.0, 1.5], n_points=n, exact=True)
        same_grid = closed_form_kinetic(W, x0, 0.0, 1.5, n)
        assert out["kinetic"] == pytest.approx(same_grid, rel=1e-8)  # only solver error
        assert out["jacobian"] == pytest.approx(1.5 * fro2, rel=1e-12)
        assert out["total"] == pytest.approx(out["kinetic"] + out["jacobian"], rel=1e-15)
    fine = closed_form_kinetic(W, x0, 0.0, 1.5, 20001)
    assert out["kinetic"] == pytest.approx(fine, rel=1e-4)  # n=129 vs the fine trapezoid


def test_linear_reversed_span():
    node, W = linear_node()
    x0 = mlp_data(batch=3, dim=4)
    out = kinetic_jacobian(node, x0, t_span=torch.tensor([1.0, 0.0]), n_points=65, exact=True)
    # Backwards from t=1: x(1 - s) = e^{-Ws} x0, F = W x; both integrals are over |t1 - t0|.
    ts = torch.linspace(0.0, 1.0, 65, dtype=DTYPE)
    E = torch.linalg.matrix_exp(-W[None] * ts[:, None, None])
    sq = torch.einsum("ij,njk,bk->nbi", W, E, x0).pow(2).sum(-1)
    assert out["kinetic"] == pytest.approx(float(torch.trapezoid(sq, ts, dim=0).mean()), rel=1e-8)
    assert out["jacobian"] == pytest.approx(float(W.pow(2).sum()), rel=1e-12)


def test_linear_hutchinson_matches_exact():
    node, W = linear_node()
    x0 = mlp_data(batch=5, dim=4)
    exact = kinetic_jacobian(node, x0, n_points=9, exact=True)
    gen = torch.Generator().manual_seed(1)
    est = kinetic_jacobian(node, x0, n_points=9, hutchinson_samples=2000, generator=gen)
    assert est["kinetic"] == pytest.approx(exact["kinetic"], rel=1e-12)
    assert est["jacobian"] == pytest.approx(exact["jacobian"], rel=0.03)
    assert est["jacobian"] != exact["jacobian"]  # it is an estimate
    # Reproducible with a reseeded generator.
    gen.manual_seed(1)
    again = kinetic_jacobian(node, x0, n_points=9, hutchinson_samples=2000, generator=gen)
    assert again == est


# --------------------------------------------------------------------------- nonlinear fields


def _reference_jacobian_integral(field: nn.Module, x0: Tensor, n: int) -> float:
    """Exact ‖∂F/∂x‖²_F per sample with torch.func on the same trajectory, trapezoid in t."""
    ts = torch.linspace(0.0, 1.0, n, dtype=DTYPE)
    with torch.no_grad():
        _, traj = odeint(lambda t, x: field(x), x0, ts, make_solver("dopri5"), TOL, TOL)

    def one(x: Tensor) -> Tensor:
        return field(x[None])[0]

    jac = torch.func.vmap(torch.func.jacrev(one))
    sq = torch.stack([jac(traj[i]).detach().pow(2).sum((-2, -1)) for i in range(n)])  # (n, B)
    return float(torch.trapezoid(sq, ts, dim=0).mean())


def test_mlp_exact_and_hutchinson():
    field = mlp_field()
    node = NeuralODE(field, solver=make_solver("dopri5"), atol=TOL, rtol=TOL, sensitivity="snopt")
    x0 = mlp_data(batch=6)
    exact = kinetic_jacobian(node, x0, n_points=17, exact=True)
    assert exact["jacobian"] == pytest.approx(
        _reference_jacobian_integral(field, x0, 17), rel=1e-10
    )
    gen = torch.Generator().manual_seed(2)
    est = kinetic_jacobian(node, x0, n_points=17, hutchinson_samples=2000, generator=gen)
    assert est["jacobian"] == pytest.approx(exact["jacobian"], rel=0.03)
    assert est["kinetic"] == pytest.approx(exact["kinetic"], rel=1e-12)
    assert exact["nfe_forward"] > 0


def test_conv_state_shape():
    field = conv_field(channels=2)
    node = NeuralODE(field, solver=make_solver("rk4"), sensitivity="snopt")
    seeded(3)
    x0 = torch.randn(3, 2, 4, 4, dtype=DTYPE)
    exact = kinetic_jacobian(node, x0, n_points=9, exact=True)
    gen = torch.Generator().manual_seed(3)
    est = kinetic_jacobian(node, x0, n_points=9, hutchinson_samples=1000, generator=gen)
    assert est["jacobian"] == pytest.approx(exact["jacobian"], rel=0.03)
    assert exact["kinetic"] > 0
    # Fixed step, default span [0, 1] in one step: four rk4 stages.
    assert exact["nfe_forward"] == 4.0
    # Exact norm vs torch.func's full (C·H·W)² Jacobian at both ends of one rk4 step.
    jac = torch.func.jacrev(lambda x: field(x[None])[0])
    ts = torch.tensor([0.0, 0.1], dtype=DTYPE)
    with torch.no_grad():
        _, traj = odeint(lambda t, x: field(x), x0, ts, make_solver("rk4"))
    ends = [torch.stack([jac(x).detach().pow(2).sum() for x in xs]).mean() for xs in traj]
    one = kinetic_jacobian(node, x0, t_span=ts, n_points=2, exact=True)
    assert one["jacobian"] == pytest.approx(float(0.05 * (ends[0] + ends[1])), rel=1e-12)


def test_datacontrol_and_default_t_span():
    field = datacontrol_field()
    node = NeuralODE(field, solver=make_solver("dopri5"), atol=1e-8, rtol=1e-8)
    x0 = mlp_data(batch=4)
    a = kinetic_jacobian(node, x0, n_points=5, exact=True)
    node.t_span = torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE)
    b = kinetic_jacobian(node, x0, n_points=5, exact=True)
    assert b["kinetic"] == pytest.approx(a["kinetic"], rel=1e-6)
    assert b["jacobian"] == pytest.approx(a["jacobian"], rel=1e-6)


# --------------------------------------------------------------------------- side effects


def test_leaves_model_and_curvature_state_alone():
    field = mlp_field()
    node = NeuralODE(field, solver=make_solver("dopri5"), atol=1e-6, rtol=1e-6, sensitivity="snopt")
    pre = SNOptPreconditioner(node, update_freq=1, grid_size=5)
    x0 = mlp_data(batch=4)
    node(x0)[1][-1].pow(2).sum().backward()  # a training step's backward, sampled
    record = record_of(node)
    request = record.request
    before_params = [p.detach().clone() for p in node.parameters()]
    before_grads = [p.grad.clone() for p in node.parameters()]
    nfe_vf, nfe_s = node.vf.nfe, vars(record.nfe).copy()
    armed, factors = pre.armed, request.factors.view()

    out = kinetic_jacobian(node, x0, n_points=5, hutchinson_samples=3)

    assert out["nfe_forward"] > 0
    for p, q in zip(node.parameters(), before_params):
        assert torch.equal(p, q)
    for p, g in zip(node.parameters(), before_grads):
        assert torch.equal(p.grad, g)
    assert node.vf.nfe == nfe_vf
    assert vars(record.nfe) == nfe_s
    assert pre.armed == armed and request.armed == armed
    assert request.factors.view().keys() == factors.keys()
    assert pre.step()  # the optimizer still works on the same gradients


def test_no_sampler_created_and_buffers_restored():
    seeded()
    field = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Tanh()).to(DTYPE)
    node = NeuralODE(field, solver="rk4", sensitivity="autograd")
    bn = field[1]
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    kinetic_jacobian(node, mlp_data(batch=4), n_points=3)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == count
    assert existing_record(node) is None
    assert all(p.grad is None for p in node.parameters())


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("value", [1, 0, -3, 2.5, True, "9"])
def test_bad_n_points(value):
    node, _ = linear_node()
    with pytest.raises(ValueError, match=rf"n_points={value!r}.*accepted: an int >= 2"):
        kinetic_jacobian(node, mlp_data(dim=4), n_points=value)


@pytest.mark.parametrize("value", [0, -1, 1.0, False])
def test_bad_hutchinson_samples(value):
    node, _ = linear_node()
    with pytest.raises(ValueError, match=rf"hutchinson_samples={value!r}.*accepted: an int >= 1"):
        kinetic_jacobian(node, mlp_data(dim=4), hutchinson_samples=value)


@pytest.mark.parametrize("t_span", [[0.0], [[0.0, 1.0]], [0.0, float("nan")]])
def test_bad_t_span(t_span):
    node, _ = linear_node()
    with pytest.raises(ValueError, match="t_span="):
        kinetic_jacobian(node, mlp_data(dim=4), t_span=t_span)
