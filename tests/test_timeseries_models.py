"""ODERNN and NeuralCDE: "snopt" gradients equal "autograd" ones (float64, irregular times,
missing values, variable lengths), and what the models do with padding and missing values."""

import pytest
import torch
import torch.nn.functional as F
from torchdyn.core import NeuralODE

import torchdyn_snopt as tds
from tests.helpers.data import irregular_series
from tests.helpers.gradients import assert_close
from tests.helpers.numerics import DTYPE, make_solver
from torchdyn_snopt.adjoint import set_horizon
from torchdyn_snopt.models import ODERNN, NeuralCDE

TOL = 1e-9
#: NCDE gradients, per block: measured 1.9e-7 with linear interpolation (the path's kinks
#: limit the adaptive solves), 1.6e-8 natural, 1.5e-8 hermite.
NCDE_REL = 2e-6
LABELS = torch.tensor([0, 2, 1, 2])


def _odernn(sensitivity: str) -> ODERNN:
    torch.manual_seed(0)
    return ODERNN(
        2, 3, hidden=5, width=7, sensitivity=sensitivity, solver=make_solver("dopri5"), tol=TOL
    ).to(DTYPE)


def _ncde(sensitivity: str, interpolation: str = "hermite") -> NeuralCDE:
    torch.manual_seed(0)
    return NeuralCDE(
        3,
        3,
        hidden=4,
        width=6,
        interpolation=interpolation,
        sensitivity=sensitivity,
        solver=make_solver("dopri5"),
        tol=TOL,
    ).to(DTYPE)


def _grad(model, x) -> torch.Tensor:
    loss = F.cross_entropy(model(x), LABELS)
    g = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([q.reshape(-1) for q in g])


def test_odernn_snopt_gradients_equal_autograd():
    x = irregular_series()
    assert_close(_grad(_odernn("snopt"), x), _grad(_odernn("autograd"), x))


@pytest.mark.parametrize("interpolation", ["hermite", "natural", "linear"])
def test_ncde_snopt_gradients_equal_autograd(interpolation):
    x = irregular_series()
    x[1, -2:] = x[1, -3]  # torchcde's convention for a shorter series: repeat its last row
    model = _ncde("snopt", interpolation)
    coeffs = model.coefficients(x)
    ref = _grad(_ncde("autograd", interpolation), coeffs)
    assert_close(_grad(model, coeffs), ref, rel=NCDE_REL)


def test_odernn_padding_does_not_change_a_series_prediction():
    """A series' logits depend on its own observations only, whatever the batch pads."""
    x = irregular_series()
    model = _odernn("snopt")
    with torch.no_grad():
        batch = model(x)
        alone = model(x[1:2, :-2])  # series 1 without its NaN padding
        shifted = model(x[0:1])
    assert torch.allclose(batch[1], alone[0], atol=1e-7)
    assert torch.allclose(batch[0], shifted[0], atol=1e-7)


def test_odernn_missing_channel_is_masked_not_zero():
    """A NaN value is "not observed", which differs from an observed 0 (the mask input)."""
    x = irregular_series()
    zero = x.clone()
    zero[0, 2, 1] = 0.0  # channel 0 of series 0 at step 2 was NaN
    model = _odernn("snopt")
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], model(zero)[0])
        assert torch.isfinite(model(x)).all()


def test_ncde_state_stops_after_a_series_ends():
    model = _ncde("snopt")
    x = irregular_series()
    coeffs = model.coefficients(x)  # series 1 has 2 NaN rows at its end: filled, path constant
    with torch.no_grad():
        z = model.trajectory(coeffs)
    assert torch.allclose(z[-1, 1], z[-3, 1], atol=1e-8)
    assert not torch.allclose(z[-1, 0], z[-3, 0], atol=1e-3)


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match="interpolation='cubic'"):
        NeuralCDE(3, 2, interpolation="cubic")
    with pytest.raises(ValueError, match="in_channels=0"):
        ODERNN(0, 2)
    with pytest.raises(ValueError, match="x has shape"):
        ODERNN(2, 3)(torch.zeros(2, 4, 5))


def _span_factors(chained: bool, horizon: bool = True):
    """Factors of one rk4 solve over 10 knots of [0, 1], or of 10 chained short solves."""
    torch.manual_seed(0)
    field = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        DTYPE
    )
    node = NeuralODE(field, sensitivity="snopt", solver="rk4", return_t_eval=False)
    pre = tds.SNOptPreconditioner(node, update_freq=1)
    knots = torch.linspace(0.0, 1.0, 11, dtype=DTYPE)
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    if chained:
        if horizon:
            set_horizon(node, 1.0)  # what ODERNN sets: the sequence's range
        for k in range(10):
            x = node(x, knots[k : k + 2])[-1]
    else:
        x = node(x, knots)[-1]
    (x**2).sum().backward()
    pre.step()
    return list(pre.last_factors.values())


def test_short_solves_add_up_to_one_long_solve():
    """ODE-RNN's many short solves: their curvature, each integrated over its own span (so
    weighted by it) with the sequence's Gauss-Newton scale, is that of one long solve."""
    long, chained = _span_factors(False), _span_factors(True)
    for a, b in zip(long, chained):
        for m_long, m_chain in ((a.A, b.A), (a.B, b.B)):
            assert float((m_long - m_chain).norm() / m_long.norm()) < 5e-4  # measured 1.2e-4
    per_solve = _span_factors(True, horizon=False)  # each short solve its own q scale
    assert float(per_solve[0].B.norm() / long[0].B.norm()) > 5.0
