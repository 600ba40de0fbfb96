"""SNOpt / SNOptPreconditioner: update rule limits, resume, bad input, non-finite steps."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdyn_snopt as tds
from tests.fixtures import OdeClassifier, classification_data

DT = torch.float64


def _data(n: int = 64, seed: int = 0, dtype=DT):
    return classification_data(n, seed, dtype)


def _model(seed: int = 0, dtype=DT, **kw) -> OdeClassifier:
    torch.manual_seed(seed)
    return OdeClassifier(**kw).to(dtype)


def _train(model, opt, steps, x, y, start=0):
    for i in range(start, start + steps):
        idx = torch.arange(i * 16, i * 16 + 16) % len(x)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def test_huge_eps_reduces_to_scaled_sgd():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = tds.SNOpt(model, lr=0.5, momentum=0.0, eps=1e8, full_precond=True)
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, b, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach() - b, -0.5 / 1e8 * g, rtol=1e-5, atol=1e-14)


def test_uncovered_parameters_warn_once_with_names():
    model = _model()
    with pytest.warns(UserWarning, match=r"enc\.weight.*head\.bias"):
        tds.SNOpt(model, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tds.SNOpt(_model(), lr=0.1, full_precond=True)  # everything covered: no warning


def test_full_precond_samples_outer_layers():
    model = _model()
    opt = tds.SNOpt(model, lr=0.1, full_precond=True)
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    names = set(opt.preconditioner.last_factors)
    assert {"enc", "head", "ode.vf.vf.l1", "ode.vf.vf.l2"} == names
    head = opt.preconditioner.last_factors["head"]
    assert head.A.shape == (5, 5) and head.B.shape == (3, 3)
    # B of the head from g = batch · ∂L/∂h: the per-sample softmax residuals.
    with torch.no_grad():
        z = model.ode(model.enc(x), model.t)[-1]
        r = torch.softmax(model.head(z), 1) - F.one_hot(y, 3)
    # parameters moved by one step, so compare the pre-step recomputation loosely
    assert torch.allclose(head.B, r.t() @ r / len(x), rtol=0.2, atol=0.05)


def test_weight_decay_enters_gradient_and_damping():
    x, y = _data()
    outs = []
    for wd in (0.0, 0.3):
        model = _model()
        opt = tds.SNOpt(model, lr=0.1, momentum=0.0, weight_decay=wd, full_precond=True)
        _train(model, opt, 3, x, y)
        outs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert outs[1].norm() < outs[0].norm()


def test_checkpoint_resume_is_exact():
    x, y = _data()
    model = _model()
    opt = tds.SNOpt(model, lr=0.05, update_freq=3, full_precond=True)
    _train(model, opt, 4, x, y)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, 5, x, y, start=4)
    ref = [p.detach().clone() for p in model.parameters()]

    resumed = _model(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = tds.SNOpt(resumed, lr=0.05, update_freq=3, full_precond=True)
    opt2.load_state_dict(saved_opt)
    assert opt2.preconditioner.steps == 4
    _train(resumed, opt2, 5, x, y, start=4)
    for p, r in zip(resumed.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)


def test_preconditioner_with_adam_and_state_dict():
    x, y = _data()
    model = _model()
    precond = tds.SNOptPreconditioner(model, update_freq=2, full_precond=True)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        adam.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert precond.step()
        adam.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = precond.state_dict()
    assert state["steps"] == 6 and set(state["layers"]) == set(precond.last_factors)
    other = tds.SNOptPreconditioner(_model(), update_freq=2, full_precond=True)
    other.load_state_dict(state)
    assert other.steps == 6 and other.armed == precond.armed


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"lr": 0.0}, ValueError, "lr"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"lr": 0.1, "eps": 0.0}, ValueError, "eps"),
        ({"lr": 0.1, "update_freq": 0}, ValueError, "update_freq"),
        ({"lr": 0.1, "update_freq": 2.5}, TypeError, "update_freq"),
        ({"lr": 0.1, "grid_size": 1}, ValueError, "grid_size"),
        ({"lr": 0.1, "alpha": 1.0}, ValueError, "alpha"),
        ({"lr": 0.1, "alpha": -0.1}, ValueError, "alpha"),
        ({"lr": 0.1, "momentum": 1.0}, ValueError, "momentum"),
        ({"lr": 0.1, "weight_decay": -1.0}, ValueError, "weight_decay"),
    ],
)
def test_bad_arguments_raise_and_change_nothing(kwargs, exc, match):
    model = _model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        tds.SNOpt(model, **kwargs)
    assert all(not m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_model_without_snopt_ode_is_rejected():
    plain = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="full_precond=True"):
        tds.SNOpt(plain, lr=0.1)
    adjoint_model = _model(sensitivity="adjoint")
    with pytest.raises(ValueError, match="snopt"):
        tds.SNOptPreconditioner(adjoint_model)
    with pytest.raises(TypeError, match="model"):
        tds.SNOpt("not a module", lr=0.1)


def test_nan_gradient_skips_step_and_training_continues():
    x, y = _data()
    model = _model()
    opt = tds.SNOpt(model, lr=0.05, update_freq=2, full_precond=True)
    _train(model, opt, 3, x, y)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    (F.cross_entropy(model(x), y) * float("nan")).backward()
    with pytest.warns(UserWarning, match="non-finite gradient"):
        opt.step()
    for p, b in zip(model.parameters(), params):
        assert torch.equal(p.detach(), b)
    after = opt.state_dict()
    assert after["preconditioner"]["steps"] == state["preconditioner"]["steps"]
    for name, layer in state["preconditioner"]["layers"].items():
        assert torch.equal(after["preconditioner"]["layers"][name]["m"], layer["m"])
    _train(model, opt, 2, x, y, start=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.preconditioner.steps == 5


def test_second_optimizer_on_same_model_replaces_hooks():
    model = _model()
    x, y = _data()
    tds.SNOpt(model, lr=0.05, full_precond=True)
    opt = tds.SNOpt(model, lr=0.05, full_precond=True)
    for m in (model.enc, model.head, model.ode.vf.vf.l1, model.ode.vf.vf.l2):
        assert len(m._forward_hooks) == 1
    F.cross_entropy(model(x), y).backward()
    opt.step()
    single = _model()
    ref = tds.SNOpt(single, lr=0.05, full_precond=True)
    F.cross_entropy(single(x), y).backward()
    ref.step()
    for name, f in ref.preconditioner.last_factors.items():
        torch.testing.assert_close(opt.preconditioner.last_factors[name].A, f.A)
        torch.testing.assert_close(opt.preconditioner.last_factors[name].B, f.B)


def _wide_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 3)).to(DT)


def test_low_rank_outer_factor_eigenbasis_from_rows():
    """A batch narrower than half a layer's input keeps its rows: the eigenbasis from a QR of
    them reconstructs ``A``, is orthonormal, and gives the refresh step of a full eigh."""
    import torchdyn_snopt.optim as optim_module

    x, y = torch.randn(8, 40, dtype=DT), torch.randint(0, 3, (8,))
    grads = []
    for full_eigh in (False, True):
        model = _wide_mlp()
        pre = tds.SNOptPreconditioner(model, full_precond=True)
        F.cross_entropy(model(x), y).backward()
        if full_eigh:  # the same factors through torch.linalg.eigh of A
            original = optim_module._eigh_from_rows
            optim_module._eigh_from_rows = lambda rows: optim_module._eigh(rows.t() @ rows)
        try:
            assert pre.step()
        finally:
            if full_eigh:
                optim_module._eigh_from_rows = original
        grads.append([p.grad.clone() for p in model.parameters()])
        f = pre.last_factors["0"]
        assert f.rows is not None and f.rows.shape == (8, 41)
        torch.testing.assert_close(f.rows.t() @ f.rows, f.A)
    for low, full in zip(*grads):  # G lies in the rows' span: the null-space basis is moot
        torch.testing.assert_close(low, full, rtol=1e-7, atol=1e-10)
    lam, U = optim_module._eigh_from_rows(f.rows)
    torch.testing.assert_close(U.t() @ U, torch.eye(41, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(U @ torch.diag(lam) @ U.t(), f.A, rtol=1e-10, atol=1e-12)
    assert int((lam > 1e-10).sum()) == 8


def test_factors_from_many_rows_keep_no_rows():
    model = _wide_mlp()
    pre = tds.SNOptPreconditioner(model, full_precond=True)
    x, y = torch.randn(64, 40, dtype=DT), torch.randint(0, 3, (64,))
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert all(f.rows is None for f in pre.last_factors.values())
