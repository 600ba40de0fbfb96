"""Convergence: SNOpt vs tuned Adam and SGD at the same number of iterations, fixed seeds.

A small Neural-ODE classifier on scikit-learn's digits (flattened 8×8 → 16-d state, dopri5 at
1e-3). Every optimizer gets the same initial weights (seed 0), the same minibatch stream
(generator seed 0, batch 64) and the same number of iterations, and keeps the best of a
three-point learning-rate sweep whose best point is interior for each of them (tuned); the
score is the training loss over the whole training set after the last iteration. Iteration
counts, not wall-clock budgets: the outcome does not depend on the machine's load.

SNOpt runs at its defaults (relative damping, Adam-grafted step, refresh every 10 steps,
full_precond) but for the swept ``lr``. Measured at 40 iterations (one core): SNOpt 0.084
(lr 0.1; 0.103 at 3e-2, 0.182 at 0.3; 0.079 at its default 0.05), Adam 0.242 (lr 1e-2; 0.825
at 3e-3, 0.272 at 3e-2), SGD with momentum 0.189 (lr 0.1; 0.439 at 0.03, 0.438 at 0.3):
SNOpt's best is 0.44 of the best first-order loss, at its default rate 0.42; the test asks
for at most 0.6 and 0.6 (:data:`MARGIN`, :data:`DEFAULT_MARGIN`). (The paper's rule,
``SNOpt.paper`` with update_freq 10 and full_precond, measured 0.119 at its best rate 1e-2.)
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import torchdyn_snopt as tds
from tests.helpers.models import OdeClassifier
from tests.helpers.numerics import single_thread
from torchdyn_snopt.data import load_digits

ITERATIONS = 40
MARGIN = 0.6
DEFAULT_MARGIN = 0.6
SWEEPS = {
    "adam": (3e-3, 1e-2, 3e-2),
    "sgd": (0.03, 0.1, 0.3),
    "snopt": (3e-2, 0.1, 0.3),
}


def _final_train_loss(name: str, lr: float | None, x, y) -> float:
    torch.manual_seed(0)
    sens = "snopt" if name == "snopt" else "adjoint"
    model = OdeClassifier(64, 16, 32, 10, sensitivity=sens, solver="dopri5")
    if name == "snopt":
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # full_precond covers every parameter
            opt = tds.SNOpt(model) if lr is None else tds.SNOpt(model, lr=lr)
    elif name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(ITERATIONS):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def test_snopt_beats_tuned_adam_and_sgd_at_equal_iterations():
    """SNOpt's tuned best and ``tds.SNOpt(model)`` itself against tuned Adam and SGD.

    A method-level check: mutations of the update's details (the ``batch`` factor of ``m``,
    ``α`` and ``1 − α`` swapped) survive here; the by-hand tests of test_optim and
    test_defaults kill them. The graft's bias correction dropped makes the first steps ~3x
    longer, and a graft normed per tensor changes the direction; both are killed by hand."""
    x, y, _, _ = load_digits()
    x = x.flatten(1)
    with single_thread():
        losses = {
            name: [_final_train_loss(name, lr, x, y) for lr in lrs] for name, lrs in SWEEPS.items()
        }
    best = {name: min(v) for name, v in losses.items()}
    for name, v in losses.items():  # tuned: the sweep's best point is not on its edge
        assert v.index(best[name]) == 1, (name, v)
    assert best["snopt"] < MARGIN * best["adam"], losses
    assert best["snopt"] < MARGIN * best["sgd"], losses
    with single_thread():
        default = _final_train_loss("snopt", None, x, y)
    assert default < DEFAULT_MARGIN * min(best["adam"], best["sgd"]), (default, losses)
