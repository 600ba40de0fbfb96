"""scikit-learn's digits: shapes, classes, split, standardisation."""

import pytest
import torch

from torchdyn_snopt.data import load_digits

N_DIGITS = 1797


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_shapes_and_dtypes(digits):
    x_train, y_train, x_test, y_test = digits
    assert x_train.shape[1:] == (1, 8, 8) and x_test.shape[1:] == (1, 8, 8)
    assert y_train.shape == (x_train.shape[0],) and y_test.shape == (x_test.shape[0],)
    assert x_train.shape[0] + x_test.shape[0] == N_DIGITS
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert load_digits(dtype=torch.float64)[0].dtype == torch.float64


def test_all_ten_classes_in_both_splits(digits):
    _, y_train, _, y_test = digits
    assert set(y_train.tolist()) == set(range(10))
    assert set(y_test.tolist()) == set(range(10))


def test_split_is_deterministic_per_seed(digits):
    again = load_digits(seed=0)
    for a, b in zip(digits, again, strict=True):
        assert torch.equal(a, b)
    other = load_digits(seed=1)
    assert not torch.equal(digits[1], other[1]) or not torch.equal(digits[0], other[0])


def test_train_split_is_standardised(digits):
    x_train = digits[0]
    assert x_train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x_train.std().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fraction", [0.25, 0.1, 0.5])
def test_test_fraction(fraction):
    _, y_train, _, y_test = load_digits(test_fraction=fraction)
    assert len(y_test) / N_DIGITS == pytest.approx(fraction, abs=0.01)
    # stratified: every class sends about the same fraction of its images to the test split
    counts = torch.bincount(y_test, minlength=10).double()
    totals = counts + torch.bincount(y_train, minlength=10)
    assert torch.allclose(counts / totals, torch.full((10,), fraction).double(), atol=0.02)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_invalid_test_fraction_raises(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=fraction)
