"""Convergence: SNOpt vs tuned Adam and SGD at the same wall-clock budget, fixed seed.

A small Neural-ODE classifier on scikit-learn's digits (flattened 8×8 → 16-d state, dopri5 at
1e-3). Every optimizer gets the same initial weights, the same minibatch stream and the same
wall-clock budget, and keeps the best of a three-point learning-rate sweep; the score is the
training loss over the whole training set at the end of the budget.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

import torchdyn_snopt as tds
from tests.fixtures import OdeClassifier, single_thread
from torchdyn_snopt.data import load_digits

BUDGET_S = 2.0
SWEEPS = {
    "adam": (1e-3, 3e-3, 1e-2),
    "sgd": (0.01, 0.03, 0.1),
    "snopt": (1e-3, 3e-3, 1e-2),
}


def _final_train_loss(name: str, lr: float, x, y) -> float:
    torch.manual_seed(0)
    sens = "snopt" if name == "snopt" else "adjoint"
    model = OdeClassifier(64, 16, 32, 10, sensitivity=sens, solver="dopri5")
    if name == "snopt":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # full_precond covers every parameter
            opt = tds.SNOpt(model, lr=lr, update_freq=10, full_precond=True)
    elif name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    while time.perf_counter() - start < BUDGET_S:
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_snopt_beats_tuned_adam_and_sgd_in_wall_clock():
    x, y, _, _ = load_digits()
    x = x.flatten(1)
    with single_thread():
        best = {
            name: min(_final_train_loss(name, lr, x, y) for lr in lrs)
            for name, lrs in SWEEPS.items()
        }
    assert best["snopt"] < best["adam"], best
    assert best["snopt"] < best["sgd"], best
