"""Offline density datasets: 2-D toys, sklearn tabular sets, river's Shuttle, array files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchdyn_snopt.data import (
    DENSITY_DATASETS,
    load_array_file,
    load_density_dataset,
    load_tabular,
    load_toy,
)


@pytest.mark.parametrize("name", ["circles", "moons", "8gaussians"])
def test_toys_are_deterministic_2d_draws(name):
    a_train, a_test = load_toy(name, n_train=500, n_test=100, seed=3)
    b_train, _ = load_toy(name, n_train=500, n_test=100, seed=3)
    assert a_train.shape == (500, 2) and a_test.shape == (100, 2)
    assert torch.equal(a_train, b_train) and a_train.dtype == torch.float32
    assert not torch.equal(a_train, load_toy(name, n_train=500, n_test=100, seed=4)[0])


def test_circles_are_two_rings():
    x, _ = load_toy("circles", n_train=2000, n_test=10)
    r = x.norm(dim=1)
    inner, outer = (r < 0.75).float().mean(), (r >= 0.75).float().mean()
    assert abs(inner - 0.5) < 0.05 and abs(outer - 0.5) < 0.05
    assert abs(r[r < 0.75].mean() - 0.5) < 0.03 and abs(r[r >= 0.75].mean() - 1.0) < 0.03


@pytest.mark.parametrize(("name", "dim", "n"), [("breast_cancer", 30, 569), ("wine", 13, 178)])
def test_sklearn_tabular_standardised_on_train(name, dim, n):
    train, test = load_tabular(name)
    assert train.shape[1] == test.shape[1] == dim and len(train) + len(test) == n
    torch.testing.assert_close(train.mean(0), torch.zeros(dim), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.std(0), torch.ones(dim), atol=1e-5, rtol=0)
    assert test.mean(0).abs().max() > 1e-3  # test is scaled by the train statistics


def test_shuttle_is_dequantized():
    train, test = load_tabular("shuttle")
    assert len(train) + len(test) == 49_097 and train.shape[1] == 9
    col = train[:, 0]
    assert len(col.unique()) > 1000  # integer readings plus U(0, 1) noise are all distinct


def test_array_file_loader(tmp_path):
    raw = np.random.default_rng(0).normal(size=(50, 4)) * 3 + 1
    np.save(tmp_path / "x.npy", raw)
    np.savetxt(tmp_path / "x.csv", raw, delimiter=",", header="a,b,c,d", comments="")
    a_train, a_test = load_array_file(tmp_path / "x.npy")
    b_train, _ = load_array_file(tmp_path / "x.csv")
    assert a_train.shape == (40, 4) and a_test.shape == (10, 4)
    torch.testing.assert_close(a_train, b_train)
    with pytest.raises(ValueError, match="path"):
        load_array_file(tmp_path / "missing.npy")


def test_unknown_names_are_rejected():
    assert set(DENSITY_DATASETS) >= {"circles", "moons", "breast_cancer", "wine", "shuttle"}
    for fn in (load_density_dataset, load_tabular, load_toy):
        with pytest.raises(ValueError, match="name='gas'"):
            fn("gas")
