"""SNOpt / SNOptPreconditioner: update rule limits, resume, bad input, non-finite steps."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdyn_snopt as tds
from tests.helpers.data import classification_data
from tests.helpers.models import OdeClassifier
from tests.helpers.training import train_steps

DT = torch.float64

#: The paper's preconditioner settings: these tests check eq. 14 as published (fixed damping,
#: a refresh every 100 steps, ODE layers only); ``tests/test_defaults.py`` checks the defaults.
PAPER = {"damping": "fixed", "eps": 0.05, "update_freq": 100, "full_precond": False}


def _paper_preconditioner(model, **kw) -> tds.SNOptPreconditioner:
    return tds.SNOptPreconditioner(model, **{**PAPER, **kw})


def _data(n: int = 64, seed: int = 0, dtype=DT):
    return classification_data(n, seed, dtype)


def _model(seed: int = 0, dtype=DT, **kw) -> OdeClassifier:
    torch.manual_seed(seed)
    return OdeClassifier(**kw).to(dtype)


def test_huge_eps_reduces_to_scaled_sgd():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = tds.SNOpt.paper(model, lr=0.5, momentum=0.0, eps=1e8, full_precond=True)
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
        tds.SNOpt.paper(model, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tds.SNOpt.paper(_model(), lr=0.1, full_precond=True)  # everything covered: no warning


def test_full_precond_samples_outer_layers():
    model = _model()
    opt = tds.SNOpt.paper(model, lr=0.1, full_precond=True)
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    before = _model()
    before.load_state_dict(copy.deepcopy(model.state_dict()))
    opt.step()
    names = set(opt.preconditioner.last_factors)
    assert {"enc", "head", "ode.vf.vf.l1", "ode.vf.vf.l2"} == names
    head = opt.preconditioner.last_factors["head"]
    assert head.A.shape == (5, 5) and head.B.shape == (3, 3)
    # B of the head from g = batch · ∂L/∂h: the per-sample softmax residuals, recomputed
    # with the parameters the factors were sampled at (the former rtol=0.2, atol=0.05 check
    # recomputed after the step and without the encoder's tanh). Measured 2e-16; bound 1e-12.
    # Kills: dropping the batch factor of an outer layer's g (curvature/outer.py).
    with torch.no_grad():
        z = before.ode(torch.tanh(before.enc(x)), before.t)[-1]
        r = torch.softmax(before.head(z), 1) - F.one_hot(y, 3)
    torch.testing.assert_close(head.B, r.t() @ r / len(x), rtol=0, atol=1e-12)


LAYERS = {"enc": "enc", "ode.vf.vf.l1": "ode.vf.vf.l1", "ode.vf.vf.l2": "ode.vf.vf.l2"}


def _layer_matrices(model, name):
    """``(G, Θ)``: the layer's gradient and parameters, bias as the last column."""
    lin = model.get_submodule(name)
    G = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone()
    theta = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).clone()
    return G, theta


def _by_hand(G, theta, basis, m_prev, batch, alpha, eps, wd):
    """One EKFAC step by hand: ``m = α m_prev + (1-α)·batch·G'²`` in the basis ``(U_A, U_B)``,
    ``P = U_B ((G' + γ U_Bᵀ Θ U_A) / (m + eps + γ)) U_Aᵀ``. Returns ``(P, m)``."""
    UA, UB = basis
    G1 = UB.t() @ G @ UA
    m = alpha * m_prev + (1 - alpha) * batch * G1.square()
    G1 = G1 + wd * (UB.t() @ theta @ UA)
    return UB @ (G1 / (m + eps + wd)) @ UA.t(), m


def _fresh(f):
    """Eigenbasis and ``m0 = λ_B λ_Aᵀ·L`` of a layer's factors, by hand."""
    lam_a, UA = torch.linalg.eigh(f.A)
    lam_b, UB = torch.linalg.eigh(f.B)
    return (UA, UB), torch.outer(lam_b.clamp(min=0), lam_a.clamp(min=0)) * f.locations


def _batch_grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_preconditioned_gradient_by_hand_over_two_steps(wd):
    """``.grad`` after SNOptPreconditioner.step against eigh of ``last_factors`` by hand:
    step 1 refreshes (``m0 = λ_B λ_Aᵀ``), step 2 keeps the eigenbasis and carries ``m`` with
    alpha. Measured max abs difference 0 (gradients up to 1.2); bound 1e-12.

    Kills: dropping the ``batch`` factor; ``α`` and ``1 − α`` swapped; ``m`` not carried to
    the next step; weight decay missing from the numerator (``γθ``) or the damping (``+γ``)."""
    x, y = _data(64)
    model = _model()
    alpha, eps, n = 0.75, 0.05, 16
    pre = _paper_preconditioner(
        model, eps=eps, alpha=alpha, update_freq=10, weight_decay=wd, full_precond=True
    )
    state = {}
    for step in range(2):
        xb, yb = x[step * n : (step + 1) * n], y[step * n : (step + 1) * n]
        _batch_grads(model, xb, yb)
        mats = {name: _layer_matrices(model, name) for name in LAYERS}
        assert pre.step()
        if step == 0:
            assert set(LAYERS) <= set(pre.last_factors)
            state = {name: _fresh(pre.last_factors[name]) for name in LAYERS}
        for name in LAYERS:
            basis, m_prev = state[name]
            P, m = _by_hand(*mats[name], basis, m_prev, n, alpha, eps, wd)
            state[name] = (basis, m)
            got = _layer_matrices(model, name)[0]
            torch.testing.assert_close(got, P, rtol=0, atol=1e-12)
        assert not pre.armed


def test_weight_decay_of_uncovered_parameters_is_exactly_gamma_theta():
    """Without ``full_precond`` the encoder and head have no adapter: their ``.grad`` becomes
    exactly ``g + γθ`` (no damping, no curvature); the ODE layers follow the by-hand rule.

    Kills: the decay added to the covered instead of the uncovered parameters; decay ``γ²θ``."""
    x, y = _data(16)
    model, wd = _model(), 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enc and head get the plain gradient
        pre = _paper_preconditioner(model, weight_decay=wd, update_freq=10)
    _batch_grads(model, x, y)
    plain = {n: (p.grad.clone(), p.detach().clone()) for n, p in model.named_parameters()}
    mats = {name: _layer_matrices(model, name) for name in ("ode.vf.vf.l1", "ode.vf.vf.l2")}
    assert pre.step()
    for name, p in model.named_parameters():
        if name.startswith(("enc.", "head.")):
            g, theta = plain[name]
            torch.testing.assert_close(p.grad, g + wd * theta, rtol=0, atol=1e-15)
    for name, (G, theta) in mats.items():
        basis, m0 = _fresh(pre.last_factors[name])
        P, _ = _by_hand(G, theta, basis, m0, 16, 0.75, 0.05, wd)
        torch.testing.assert_close(_layer_matrices(model, name)[0], P, rtol=0, atol=1e-12)


def test_kl_clip_scales_every_layer_by_hand():
    """``kl_clip``: every preconditioned gradient times
    ``ν = min(1, sqrt(κ / (lr² |Σ⟨P, G⟩|)))``, with ``ν < 1`` here.

    Kills: ``lr`` instead of ``lr²``; ``ν`` without the square root."""
    x, y = _data(16)
    model, kl, lr = _model(), 1e-4, 0.1
    pre = _paper_preconditioner(model, kl_clip=kl, lr=lr, update_freq=10, full_precond=True)
    _batch_grads(model, x, y)
    mats = {name: _layer_matrices(model, name) for name in [*LAYERS, "head"]}
    assert pre.step()
    hand = {}
    for name, (G, theta) in mats.items():
        basis, m0 = _fresh(pre.last_factors[name])
        hand[name] = _by_hand(G, theta, basis, m0, 16, 0.75, 0.05, 0.0)[0]
    vg = sum(float((hand[k] * mats[k][0]).sum()) for k in hand)
    nu = min(1.0, math.sqrt(kl / (lr**2 * abs(vg))))
    assert nu < 0.5, nu  # the clip is active
    for name, P in hand.items():
        torch.testing.assert_close(_layer_matrices(model, name)[0], nu * P, rtol=0, atol=1e-12)


def test_snopt_momentum_and_update_by_hand_over_three_steps():
    """SNOpt's update: ``buf = d`` at the first step, then ``buf = μ·buf + d`` and
    ``p ← p − lr·buf``, with ``d`` the preconditioned gradient SNOpt leaves in ``.grad``.

    Kills: dampening (``(1 − μ)·d``); the buffer restarted at every step."""
    x, y = _data(48)
    model, lr, mom = _model(), 0.05, 0.9
    opt = tds.SNOpt.paper(model, lr=lr, momentum=mom, update_freq=2, full_precond=True)
    bufs = {}
    for step in range(3):
        _batch_grads(model, x[step * 16 : (step + 1) * 16], y[step * 16 : (step + 1) * 16])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        for n, p in model.named_parameters():
            d = p.grad
            bufs[n] = d.clone() if step == 0 else mom * bufs[n] + d
            torch.testing.assert_close(p.detach(), before[n] - lr * bufs[n], rtol=0, atol=1e-15)


def test_checkpoint_resume_is_exact():
    x, y = _data()
    model = _model()
    opt = tds.SNOpt.paper(model, lr=0.05, update_freq=3, full_precond=True)
    train_steps(model, opt, 4, x, y)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train_steps(model, opt, 5, x, y, start=4)
    ref = [p.detach().clone() for p in model.parameters()]

    resumed = _model(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = tds.SNOpt.paper(resumed, lr=0.05, update_freq=3, full_precond=True)
    opt2.load_state_dict(saved_opt)
    assert opt2.preconditioner.steps == 4
    train_steps(resumed, opt2, 5, x, y, start=4)
    for p, r in zip(resumed.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-12)


def test_preconditioner_with_adam_and_state_dict():
    x, y = _data()
    model = _model()
    precond = _paper_preconditioner(model, update_freq=2, full_precond=True)
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
    other = _paper_preconditioner(_model(), update_freq=2, full_precond=True)
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
        tds.SNOpt(plain, lr=0.1, full_precond=False)
    tds.SNOpt(plain)  # no ODE at all: K-FAC on every layer (full_precond, the default)
    adjoint_model = _model(sensitivity="adjoint")
    with pytest.raises(ValueError, match=r"\(ode\) use a sensitivity.*sensitivity='snopt'"):
        tds.SNOptPreconditioner(adjoint_model)
    with pytest.raises(TypeError, match="model"):
        tds.SNOpt("not a module", lr=0.1)


def test_nan_gradient_skips_step_and_training_continues():
    x, y = _data()
    model = _model()
    opt = tds.SNOpt.paper(model, lr=0.05, update_freq=2, full_precond=True)
    train_steps(model, opt, 3, x, y)
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
    train_steps(model, opt, 2, x, y, start=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.preconditioner.steps == 5


def test_second_optimizer_on_same_model_replaces_hooks():
    model = _model()
    x, y = _data()
    tds.SNOpt.paper(model, lr=0.05, full_precond=True)
    opt = tds.SNOpt.paper(model, lr=0.05, full_precond=True)
    for m in (model.enc, model.head, model.ode.vf.vf.l1, model.ode.vf.vf.l2):
        assert len(m._forward_hooks) == 1
    F.cross_entropy(model(x), y).backward()
    opt.step()
    single = _model()
    ref = tds.SNOpt.paper(single, lr=0.05, full_precond=True)
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
    import torchdyn_snopt.layer_state as state_module
    from torchdyn_snopt.curvature.eigenbasis import eigh_exact

    x, y = torch.randn(8, 40, dtype=DT), torch.randint(0, 3, (8,))
    grads = []
    for full_eigh in (False, True):
        model = _wide_mlp()
        pre = _paper_preconditioner(model, full_precond=True)
        F.cross_entropy(model(x), y).backward()
        if full_eigh:  # the same factors through torch.linalg.eigh of A
            original = state_module.eigh_from_rows
            state_module.eigh_from_rows = lambda rows: eigh_exact(rows.t() @ rows)
        try:
            assert pre.step()
        finally:
            if full_eigh:
                state_module.eigh_from_rows = original
        grads.append([p.grad.clone() for p in model.parameters()])
        f = pre.last_factors["0"]
        assert f.rows is not None and f.rows.shape == (8, 41)
        torch.testing.assert_close(f.rows.t() @ f.rows, f.A)
    for low, full in zip(*grads):  # G lies in the rows' span: the null-space basis is moot
        torch.testing.assert_close(low, full, rtol=1e-7, atol=1e-10)
    lam, U = state_module.eigh_from_rows(f.rows)
    torch.testing.assert_close(U.t() @ U, torch.eye(41, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(U @ torch.diag(lam) @ U.t(), f.A, rtol=1e-10, atol=1e-12)
    assert int((lam > 1e-10).sum()) == 8


def test_factors_from_many_rows_keep_no_rows():
    model = _wide_mlp()
    pre = _paper_preconditioner(model, full_precond=True)
    x, y = torch.randn(64, 40, dtype=DT), torch.randint(0, 3, (64,))
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert all(f.rows is None for f in pre.last_factors.values())
