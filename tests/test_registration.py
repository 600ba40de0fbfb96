"""Registration of the "snopt"/"snopt_adjoint" sensitivities in torchdyn's ODEProblem."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
from torchdyn.core import NeuralODE
from torchdyn.core.problems import ODEProblem
from torchdyn.numerics.solvers.ode import DormandPrince45, Tsitouras45

import torchdyn_snopt as tds
import torchdyn_snopt.registration as registration
from tests.helpers.data import mlp_data
from tests.helpers.gradients import assert_close, grads, rel_err, trajectory_loss
from tests.helpers.models import mlp_field
from tests.helpers.numerics import DTYPE, REL, is_fixed, make_solver, single_thread

#: Solvers of torchdyn's SOLVER_DICT that apply to a first-order ODE ("alf" needs a
#: position/velocity split of the state and fails with any adjoint, torchdyn's included).
SOLVERS = ("euler", "midpoint", "rk4", "dopri5", "tsit5", "ieuler")
pytestmark = pytest.mark.filterwarnings("ignore:Setting tolerances has no effect:UserWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


T_SHORT = torch.linspace(0.0, 1.0, 6, dtype=DTYPE)
#: Accuracy of a backward solve with one fixed step per interval on an 11-point grid,
#: measured per block against autograd through a tight dopri5 solve: euler/ieuler 1.6e-2 and
#: midpoint 1.5e-4 (the first/second-order truncation error itself), rk4 7.6e-9.
ADJOINT_SOLVER_REL = {
    "euler": 3e-2,
    "ieuler": 3e-2,
    "midpoint": 1e-3,
    "rk4": REL,
    "dopri5": REL,
    "tsit5": REL,
}


def node_grads(
    sensitivity: str, solver, *, tol: float = 1e-8, **kw
) -> tuple[torch.Tensor, NeuralODE]:
    """Gradient through a NeuralODE built exactly as a user would (solver by name allowed)."""
    field = mlp_field()
    tols = {} if is_fixed(solver) else {"atol": tol, "rtol": tol}
    node = NeuralODE(
        field,
        sensitivity=sensitivity,
        solver=solver,
        atol_adjoint=tol,
        rtol_adjoint=tol,
        **tols,
        **kw,
    )
    x = mlp_data().requires_grad_(True)
    _, sol = node(x, T_SHORT)
    named = [*field.named_parameters(), ("x0", x)]
    g = torch.autograd.grad(trajectory_loss(sol), [p for _, p in named])
    return {n: q for (n, _), q in zip(named, g)}, node


def test_sensitivities_tuple():
    assert set(tds.SENSITIVITIES) == {"snopt", "snopt_adjoint"}


@pytest.mark.parametrize("sensitivity", ["snopt", "snopt_adjoint"])
def test_both_names_work_with_neuralode(sensitivity):
    g, node = node_grads(sensitivity, "dopri5")
    assert node.sensalg == sensitivity
    assert registration.is_snopt_problem(node)
    ref, _ = node_grads("autograd", "dopri5")
    assert_close(g, ref)


def test_snopt_and_snopt_adjoint_are_the_same_algorithm():
    a, _ = node_grads("snopt", "tsit5")
    b, _ = node_grads("snopt_adjoint", "tsit5")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("as_instance", [False, True], ids=["name", "instance"])
def test_solver_by_name_and_instance(solver, as_instance):
    spec = make_solver(solver) if as_instance else solver
    g, node = node_grads("snopt", spec)
    assert all(torch.isfinite(q).all() for q in g.values())
    if as_instance:
        assert node.solver is spec
    if solver == "ieuler":
        # torchdyn's own "adjoint" and "autograd" both raise with ImplicitEuler; check against
        # the other form (name/instance) and against a tight dopri5 reference (first order).
        other, _ = node_grads("snopt", solver if as_instance else make_solver(solver))
        assert_close(g, other, rel=1e-12)
        ref = grads(mlp_field, "autograd", "dopri5", t_span=T_SHORT)
        assert rel_err(g, ref) < 0.1
        return
    # Same solver, same tolerances: torchdyn's continuous adjoint is the same algorithm.
    spec_ref = make_solver(solver) if as_instance else solver
    ref, _ = node_grads("adjoint", spec_ref)
    assert_close(g, ref)


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_adjoint_instance(solver):
    inst = make_solver(solver)
    t_span = torch.linspace(0.0, 1.0, 11, dtype=DTYPE)
    field = mlp_field()
    node = NeuralODE(field, sensitivity="snopt", solver="dopri5", solver_adjoint=inst)
    assert node.solver_adjoint is inst
    g = grads(mlp_field, "snopt", "dopri5", t_span=t_span, solver_adjoint=inst)
    ref = grads(mlp_field, "autograd", "dopri5", t_span=t_span)
    assert_close(g, ref, rel=ADJOINT_SOLVER_REL[solver])


def test_solver_adjoint_by_name():
    g, node = node_grads("snopt", DormandPrince45(dtype=DTYPE), solver_adjoint="tsit5")
    assert isinstance(node.solver_adjoint, Tsitouras45)
    ref, _ = node_grads("autograd", DormandPrince45(dtype=DTYPE))
    assert_close(g, ref)


def test_seminorm_attribute_kept():
    assert NeuralODE(mlp_field(), sensitivity="snopt", seminorm=True).seminorm is True
    assert NeuralODE(mlp_field(), sensitivity="snopt_adjoint").seminorm is False


def test_register_is_idempotent():
    init, autograd_func = ODEProblem.__init__, ODEProblem._autograd_func
    before, _ = node_grads("snopt", "dopri5")
    registration.register()
    registration.register()
    tds.register()
    assert ODEProblem.__init__ is init
    assert ODEProblem._autograd_func is autograd_func
    # a single layer of wrapping around torchdyn's originals
    original = ODEProblem._autograd_func.__wrapped__
    assert not getattr(original, registration._MARK, False)
    assert not getattr(ODEProblem.__init__.__wrapped__, registration._MARK, False)
    after, _ = node_grads("snopt", "dopri5")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_snopt_dispatch_goes_to_snopt_odeint():
    from torchdyn_snopt.adjoint import snopt_odeint

    node = NeuralODE(mlp_field(), sensitivity="snopt")
    fn = node._autograd_func()
    assert isinstance(fn, functools.partial)
    assert fn.func is snopt_odeint and fn.args == (node,)


def test_torchdyn_sensitivities_untouched():
    # "autograd": torchdyn's dispatch returns None (odeint is called directly)
    node = NeuralODE(mlp_field(), sensitivity="autograd")
    assert node._autograd_func() is None
    # "adjoint": torchdyn's own autograd.Function
    node = NeuralODE(mlp_field(), sensitivity="adjoint")
    fn = node._autograd_func()
    assert fn.__self__.__module__ == "torchdyn.numerics.sensitivity"
    assert not registration.is_snopt_problem(node)
    # and their gradients are still the usual ones (they agree with each other)
    adj, _ = node_grads("adjoint", DormandPrince45(dtype=DTYPE), tol=1e-10)
    ag, _ = node_grads("autograd", DormandPrince45(dtype=DTYPE), tol=1e-10)
    assert_close(adj, ag)


def test_torchdyn_adjoint_rejects_solver_adjoint_instance_but_snopt_accepts_it():
    # torchdyn's __init__ only takes solver_adjoint by name; the wrapper only changes that
    # for the snopt sensitivities.
    with pytest.raises((KeyError, TypeError)):
        NeuralODE(mlp_field(), sensitivity="adjoint", solver_adjoint=make_solver("rk4"))
    inst = make_solver("rk4")
    assert NeuralODE(mlp_field(), sensitivity="snopt", solver_adjoint=inst).solver_adjoint is inst


@pytest.mark.parametrize("bad", ["snopt_adjiont", "SNOpt", "adjont", "", None, 3])
def test_misspelt_sensitivity_raises(bad):
    with pytest.raises(ValueError) as info:
        NeuralODE(mlp_field(), sensitivity=bad)
    message = str(info.value)
    assert "snopt" in message and "adjoint" in message
    assert repr(bad) in message


def test_misspelt_sensitivity_raises_for_odeproblem():
    with pytest.raises(ValueError, match="snopt"):
        ODEProblem(mlp_field(), solver="dopri5", sensitivity="snopt2")


def test_vector_field_without_time_argument_is_fine():
    # the plain nn.Module (no t argument) gets wrapped by torchdyn; snopt must call it as (t, x)
    field = nn.Linear(3, 3).to(DTYPE)
    node = NeuralODE(field, sensitivity="snopt", solver="rk4")
    x = mlp_data().requires_grad_(True)
    _, sol = node(x, T_SHORT)
    sol[-1].sum().backward()
    assert x.grad is not None and field.weight.grad is not None
