"""torchcde.cdeint users: CurvatureTap gives SNOpt the same factors as the NeuralODE route,
and torchcde's gradients are untouched."""

import warnings

import pytest
import torch
import torchcde
from torchdyn.core import NeuralODE

import torchdyn_snopt as tds
from tests.helpers.data import cde_path_series
from tests.helpers.numerics import DTYPE, make_solver
from torchdyn_snopt.models.ncde import CDEField, CDEFunc

TOL = 1e-10
#: Both routes read A(t), B(t) off the grid by linear interpolation between their own nodes
#: (torchdyn's accepted steps vs torchdiffeq's); at TOL the two differ by ~7e-4 and each is
#: within ~7e-4 of the exact grid values. Without the tap's solve-boundary handling: 5e-3.
FACTOR_REL = 2e-3


def _parts():
    torch.manual_seed(0)
    func = CDEFunc(3, 5, 7).to(DTYPE)
    init = torch.nn.Linear(3, 5).to(DTYPE)
    head = torch.nn.Linear(5, 2).to(DTYPE)
    return func, init, head


def _path():
    x, t = cde_path_series()
    return torchcde.CubicSpline(
        torchcde.hermite_cubic_coefficients_with_backward_differences(x, t), t
    ), t


def _loss(z_all, head):  # whole-sequence loss: every observation time
    return (head(z_all) ** 2).mean() + head(z_all).sin().sum()


def _precond(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init/head are outside (full_precond=False)
        return tds.SNOptPreconditioner(model, update_freq=1, full_precond=False)


def _node_route():
    X, t = _path()
    func, init, head = _parts()
    field = CDEField(func)
    field.X = X
    solver = make_solver("dopri5")
    node = NeuralODE(
        field,
        sensitivity="snopt",
        solver=solver,
        solver_adjoint=solver,
        atol=TOL,
        rtol=TOL,
        atol_adjoint=TOL,
        rtol_adjoint=TOL,
        return_t_eval=False,
    )
    model = torch.nn.ModuleDict({"node": node, "init": init, "head": head})
    pre = _precond(model)
    z = node(init(X.evaluate(t[0])), t)  # (L, N, H)
    _loss(z, head).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    pre.step()
    return pre, grads


def _cdeint_route(tap: bool = True, arm: bool = True):
    X, t = _path()
    func, init, head = _parts()
    f = tds.CurvatureTap(func) if tap else func
    model = torch.nn.ModuleDict({"f": f, "init": init, "head": head})
    pre = _precond(model) if arm else None
    z = torchcde.cdeint(
        X, f, init(X.evaluate(t[0])), t, adjoint=True, method="dopri5", atol=TOL, rtol=TOL
    )  # (N, L, H)
    _loss(z.transpose(0, 1), head).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    if pre is not None:
        pre.step()
    return pre, grads


@pytest.fixture(scope="module")
def routes():
    return _node_route(), _cdeint_route()


def test_cdeint_route_has_the_node_route_factors(routes):
    (pre_node, _), (pre_tap, _) = routes
    f_node, f_tap = list(pre_node.last_factors.values()), list(pre_tap.last_factors.values())
    assert len(f_node) == len(f_tap) == 2  # the two Linear layers of func
    for a, b in zip(f_node, f_tap):
        for m_node, m_tap in ((a.A, b.A), (a.B, b.B)):
            rel = float((m_node - m_tap).norm() / m_node.norm())
            assert rel < FACTOR_REL, rel
        assert a.batch_size == b.batch_size == 4


def test_tap_leaves_torchcde_gradients_alone(routes):
    (_, g_node), (_, g_tap) = routes
    _, g_plain = _cdeint_route(tap=False, arm=False)
    for a, b in zip(g_tap, g_plain):
        assert torch.equal(a, b)  # bit for bit: the tap changes nothing torchcde computes
    for a, b in zip(g_node, g_plain):  # both adjoints agree (torchdiffeq interpolates its
        assert float((a - b).norm() / b.norm()) < 5e-4  # outputs: ~1e-4 apart at TOL)


def test_unarmed_tap_records_nothing():
    X, t = _path()
    func, init, _ = _parts()
    tap = tds.CurvatureTap(func)
    z = torchcde.cdeint(X, tap, init(X.evaluate(t[0])), t, adjoint=True, method="dopri5")
    z.sum().backward()
    assert tap.sampler.nfe.curvature == 0 and not tap.sampler.factors


def test_tap_wants_a_module():
    with pytest.raises(TypeError, match="func=function"):
        tds.CurvatureTap(lambda t, z: z)
