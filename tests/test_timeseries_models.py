"""ODERNN and NeuralCDE: "snopt" gradients equal "autograd" ones (float64, irregular times,
missing values, variable lengths), and what the models do with padding and missing values."""

import pytest
import torch
import torch.nn.functional as F

from tests.fixtures import DTYPE, assert_close, irregular_series, make_solver
from torchdyn_snopt.models import ODERNN, NeuralCDE

TOL = 1e-9
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
    assert_close(_grad(model, coeffs), _grad(_ncde("autograd", interpolation), coeffs))


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
