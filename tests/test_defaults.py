"""SNOpt's default step: relative damping and the grafted step size, by hand; the paper's
rule kept as an option; the defaults against Adam at equal iterations."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchdyn.core import NeuralODE

import torchdyn_snopt as tds

DT = torch.float64


class _Field(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, t, x, args=None):
        return self.l2(torch.tanh(self.l1(x)))


class _Net(nn.Module):
    """Linear encoder -> snopt NeuralODE (rk4, 4 steps on [0, 1]) -> linear head."""

    def __init__(self, d_in: int = 6, dim: int = 4, hidden: int = 8, d_out: int = 3) -> None:
        super().__init__()
        self.enc = nn.Linear(d_in, dim)
        self.ode = NeuralODE(
            _Field(dim, hidden), sensitivity="snopt", solver="rk4", return_t_eval=False
        )
        self.register_buffer("t", torch.linspace(0, 1, 5))
        self.head = nn.Linear(dim, d_out)

    def forward(self, x):
        return self.head(self.ode(torch.tanh(self.enc(x)), self.t)[-1])


def _net(seed: int, dtype=DT, **kw) -> _Net:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdyn's notices
        return _Net(**kw).to(dtype)


def _classes(n: int, seed: int, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return x, y


def _regression(n: int, seed: int, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    w = torch.randn(6, 3, generator=g, dtype=dtype)
    return x, torch.sin(0.5 * x @ w)


LAYERS = ("enc", "ode.vf.vf.l1", "ode.vf.vf.l2", "head")


def _matrices(model: nn.Module, name: str, grad: bool = True) -> torch.Tensor:
    lin = model.get_submodule(name)
    if grad:
        return torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone()
    return torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1).clone()


def _ce_step(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_relative_damping_by_hand(wd):
    """``damping="relative"``: ``P = U_B (G' / (m + eps·mean(m) + γ)) U_Aᵀ`` with ``m`` the
    layer's running second moment, over a refresh and a carried step. Measured 0 difference;
    bound 1e-12.

    Kills: the absolute ``eps`` of the paper's rule; the mean over the wrong tensor (the
    previous ``m``, or the gradient); weight decay scaled by the mean."""
    x, y = _classes(64, 0)
    model = _net(0)
    alpha, eps, n = 0.75, 0.3, 16
    pre = tds.SNOptPreconditioner(
        model,
        damping="relative",
        eps=eps,
        alpha=alpha,
        update_freq=10,
        weight_decay=wd,
        full_precond=True,
    )
    state = {}
    for step in range(2):
        _ce_step(model, x[step * n : (step + 1) * n], y[step * n : (step + 1) * n])
        mats = {k: (_matrices(model, k), _matrices(model, k, grad=False)) for k in LAYERS}
        assert pre.step()
        if step == 0:
            for k in LAYERS:
                f = pre.last_factors[k]
                lam_a, UA = torch.linalg.eigh(f.A)
                lam_b, UB = torch.linalg.eigh(f.B)
                m0 = torch.outer(lam_b.clamp(min=0), lam_a.clamp(min=0)) * f.locations
                state[k] = (UA, UB, m0)
        for k in LAYERS:
            UA, UB, m_prev = state[k]
            G, theta = mats[k]
            G1 = UB.t() @ G @ UA
            m = alpha * m_prev + (1 - alpha) * n * G1.square()
            G1 = G1 + wd * (UB.t() @ theta @ UA)
            P = UB @ (G1 / (m + eps * m.mean() + wd)) @ UA.t()
            state[k] = (UA, UB, m)
            torch.testing.assert_close(_matrices(model, k), P, rtol=0, atol=1e-12)


def _adam_direction(g, st, betas, eps, t):
    b1, b2 = betas
    st["m"] = b1 * st.get("m", torch.zeros_like(g)) + (1 - b1) * g
    st["v"] = b2 * st.get("v", torch.zeros_like(g)) + (1 - b2) * g * g
    return (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + eps)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_grafted_step_by_hand_over_three_steps(momentum):
    """``graft="adam"``: each layer (weight and bias together) moves along SNOpt's
    preconditioned gradient ``P`` (heavy-ball momentum on ``P``) with the length of Adam's
    step on the raw gradient: ``Δ = −lr·‖u‖/‖b‖·b``, ``u = m̂/(√v̂ + ε)`` (bias corrected).
    ``P`` comes from an identically configured ``SNOptPreconditioner`` on a copy of the
    model. Measured 2e-17; bound 1e-13.

    Kills: Adam's bias correction missing; the norm taken per tensor instead of per layer;
    the moments fed the preconditioned instead of the raw gradient; momentum before the
    graft (or not at all)."""
    x, y = _classes(48, 1)
    model, twin = _net(1), _net(1)
    lr, betas, geps = 0.02, (0.9, 0.95), 1e-8
    kw = dict(damping="relative", eps=0.1, update_freq=2, full_precond=True)
    # warmup=0: the rate ramp has its own test (test_warmup_is_the_rate_ramped_by_hand)
    # length_cap=None: the cap has its own test (test_length_cap_by_hand); backoff=0: the
    # back-off has its own (tests/test_backoff.py)
    opt = tds.SNOpt(
        model, lr=lr, momentum=momentum, graft="adam", warmup=0, length_cap=None, backoff=0.0, **kw
    )
    pre = tds.SNOptPreconditioner(twin, **kw)
    adam: dict[str, dict] = {}
    bufs: dict[str, torch.Tensor] = {}
    for step in range(3):
        xb, yb = x[step * 16 : (step + 1) * 16], y[step * 16 : (step + 1) * 16]
        _ce_step(model, xb, yb)
        _ce_step(twin, xb, yb)
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        assert pre.step()
        for k in LAYERS:
            names = [f"{k}.weight", f"{k}.bias"]
            u = [
                _adam_direction(raw[n], adam.setdefault(n, {}), betas, geps, step + 1)
                for n in names
            ]
            d = dict(twin.named_parameters())
            b = []
            for n in names:
                P = d[n].grad
                bufs[n] = P.clone() if step == 0 or not momentum else momentum * bufs[n] + P
                b.append(bufs[n])
            scale = torch.sqrt(sum((v * v).sum() for v in u)) / torch.sqrt(
                sum((v * v).sum() for v in b)
            )
            got = dict(model.named_parameters())
            for n, bn in zip(names, b):
                torch.testing.assert_close(
                    got[n].detach(), before[n] - lr * scale * bn, rtol=0, atol=1e-13
                )
        # the twin follows the same parameters (its preconditioner state is what we compare)
        with torch.no_grad():
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)


#: (minibatch, loss factor) of test_length_cap_by_hand's steps: one minibatch with alternating
#: signs keeps Adam's ``m̂`` (and so ``‖u‖``) short, agreeing ones let it grow back, as the
#: gradients before a late loss spike do
_STREAM = ((0, 1.0), (0, -1.0), (0, 1.0), (0, -1.0), (1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0))


@pytest.mark.parametrize(("full_precond", "warmup"), [(True, 0), (True, 2), (False, 3)])
def test_length_cap_by_hand(full_precond, warmup):
    """``length_cap=2``: each covered layer moves by ``lr_k·min(‖u‖, 2·s)/‖d‖·d`` and each
    uncovered parameter by ``lr_k·min(‖u‖, 2·s)/‖u‖·u``, where ``s`` is the shortest nonzero
    ``‖u‖`` of that layer (parameter) over the steps after the warmup, ``lr_k`` the ramped
    rate; computed by hand from Adam's moments and a twin preconditioner's ``P`` over eight
    steps whose gradients first alternate in sign (``‖u‖`` shrinks) and then agree (it
    grows back). Measured 6e-17; bound 1e-13. The cap binds on some step of covered layers
    and of uncovered parameters.

    Kills: no cap; a cap relative to the last (not the shortest) length; the shortest taken
    over the warmup too; the cap applied to covered layers only; a state that is reset."""
    x, y = _classes(5 * 16, 11)
    model, twin = _net(11), _net(11)
    lr, cap, betas, geps = 0.02, 2.0, (0.9, 0.95), 1e-8
    kw = dict(damping="relative", eps=0.1, update_freq=2, full_precond=full_precond)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full_precond=False names the uncovered layers
        opt = tds.SNOpt(model, lr=lr, warmup=warmup, length_cap=cap, backoff=0.0, **kw)
        pre = tds.SNOptPreconditioner(twin, **kw)
    covered = ("ode.vf.vf.l1", "ode.vf.vf.l2") + (("enc", "head") if full_precond else ())
    uncovered = () if full_precond else ("enc.weight", "enc.bias", "head.weight", "head.bias")
    adam: dict[str, dict] = {}
    shortest: dict[str, float] = {}
    bound: set[str] = set()
    for k, (batch, factor) in enumerate(_STREAM, start=1):
        xb, yb = x[batch * 16 : (batch + 1) * 16], y[batch * 16 : (batch + 1) * 16]
        for m in (model, twin):
            m.zero_grad()
            (factor * F.cross_entropy(m(xb), yb)).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        assert pre.step()
        lr_k = lr * min(1.0, k / warmup) if warmup else lr
        twin_grads = {n: p.grad for n, p in twin.named_parameters()}
        got = dict(model.named_parameters())
        groups = [(c, [f"{c}.weight", f"{c}.bias"], True) for c in covered]
        groups += [(n, [n], False) for n in uncovered]
        for key, names, is_covered in groups:
            u = [_adam_direction(raw[n], adam.setdefault(n, {}), betas, geps, k) for n in names]
            length = float(torch.sqrt(sum((v * v).sum() for v in u)))
            if k > warmup:
                shortest[key] = min(shortest.get(key, float("inf")), length)
                if length > cap * shortest[key]:
                    bound.add(key)
                    length = cap * shortest[key]
            d = [twin_grads[n] for n in names] if is_covered else u
            d_norm = torch.sqrt(sum((v * v).sum() for v in d))
            for n, dn in zip(names, d):
                want = before[n] - lr_k * length / d_norm * dn
                torch.testing.assert_close(got[n].detach(), want, rtol=0, atol=1e-13)
        with torch.no_grad():
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
    assert bound & set(covered) and (full_precond or bound & set(uncovered)), bound


def test_uncovered_parameters_take_adams_step():
    """Without ``full_precond`` the encoder and head have no Kronecker factors: with the
    graft they take exactly Adam's step (``torch.optim.Adam`` at the same rate, over three
    steps); without it (``graft="none"``) the plain gradient times ``lr``."""
    x, y = _classes(48, 2)
    model, ref = _net(2), _net(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = tds.SNOpt(model, lr=0.03, full_precond=False, warmup=0)
    outer = [p for n, p in ref.named_parameters() if not n.startswith("ode.")]
    adam = torch.optim.Adam(outer, lr=0.03, betas=(0.9, 0.95))  # the graft's default betas
    for step in range(3):
        xb, yb = x[step * 16 : (step + 1) * 16], y[step * 16 : (step + 1) * 16]
        _ce_step(model, xb, yb)
        _ce_step(ref, xb, yb)
        opt.step()
        adam.step()
        with torch.no_grad():  # keep the ODE layers equal so the gradients stay equal
            for (n, p), q in zip(ref.named_parameters(), model.parameters()):
                if n.startswith("ode."):
                    p.copy_(q)
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        if not n.startswith("ode."):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-14)


def test_paper_rule_is_eq14_with_heavy_ball():
    """``SNOpt.paper(model, lr)`` is the published configuration (fixed damping 0.05, no
    graft, momentum 0.9, no warmup or back-off, refresh every 100 steps, ODE layers only)
    and steps exactly like those arguments passed by hand."""
    x, y = _classes(64, 3)
    a, b = _net(3), _net(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pa = tds.SNOpt.paper(a, lr=0.05)
        pb = tds.SNOpt(
            b,
            lr=0.05,
            damping="fixed",
            eps=0.05,
            graft="none",
            momentum=0.9,
            update_freq=100,
            full_precond=False,
            warmup=0,
            backoff=0.0,
        )
    for step in range(4):
        for m, o in ((a, pa), (b, pb)):
            _ce_step(m, x[step * 16 : (step + 1) * 16], y[step * 16 : (step + 1) * 16])
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def _train(model, opt, x, y, loss_fn, steps, batch=32):
    for i in range(steps):
        idx = torch.arange(i * batch, (i + 1) * batch) % len(x)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float(loss_fn(model(x), y))


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_defaults_beat_adam_at_its_default_rate(task):
    """``tds.SNOpt(model)`` with nothing else against ``torch.optim.Adam(params)`` (lr 1e-3),
    60 iterations of the same minibatch stream from the same weights, four seeds: SNOpt's
    final training loss is below half of Adam's on every seed, and every parameter stays
    finite. Measured ratios: see the assertion message."""
    data, loss_fn, d_out = (
        (_classes, F.cross_entropy, 3) if task == "classification" else (_regression, F.mse_loss, 3)
    )
    ratios = []
    for seed in range(4):
        x, y = data(256, 10 + seed, torch.float32)
        a, b = _net(seed, torch.float32, d_out=d_out), _net(seed, torch.float32, d_out=d_out)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the defaults cover every layer: no warning
            snopt = tds.SNOpt(a)
        l_snopt = _train(a, snopt, x, y, loss_fn, 60)
        l_adam = _train(b, torch.optim.Adam(b.parameters()), x, y, loss_fn, 60)
        assert all(torch.isfinite(p).all() for p in a.parameters())
        ratios.append(l_snopt / l_adam)
    assert max(ratios) < 0.5, ratios


def resume_is_exact(
    seed: int, n: int, before: int, cut: int, after: int, **kw: Any
) -> dict[str, Any]:
    """Train ``tds.SNOpt(model, **kw)`` for ``before`` steps on ``n`` rows, save the model's
    and the optimizer's state, train ``after`` more steps on the rows from ``cut``; a fresh
    model and optimizer loaded from the saved states then take those ``after`` steps bit for
    bit. Returns the saved optimizer state (for the caller's checks of what it carries)."""
    x, y = _classes(n, seed)
    model = _net(seed)
    opt = tds.SNOpt(model, **kw)
    _train(model, opt, x, y, F.cross_entropy, before, batch=16)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, x[cut:], y[cut:], F.cross_entropy, after, batch=16)
    resumed = _net(seed + 90)
    resumed.load_state_dict(saved_model)
    opt2 = tds.SNOpt(resumed, **kw)
    opt2.load_state_dict(copy.deepcopy(saved_opt))
    _train(resumed, opt2, x[cut:], y[cut:], F.cross_entropy, after, batch=16)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    return saved_opt


def test_resume_with_graft_state_is_exact():
    """state_dict carries Adam's moments of the graft, the shortest lengths of its cap and
    the preconditioner's state: a resumed run takes bit-identical steps."""
    # 7 steps: past the warmup, so the lengths are capped
    saved = resume_is_exact(4, 96, before=7, cut=64, after=3, update_freq=3)
    assert sum("shortest" in e for e in saved["state"].values()) == len(LAYERS)


@pytest.mark.parametrize("graft", ["adam", "none"])
def test_warmup_is_the_rate_ramped_by_hand(graft):
    """``warmup=4`` takes the same steps as ``warmup=0`` whose rate is set by hand to
    ``lr·min(1, k/4)`` before the ``k``-th step (k = 1..7), bit for bit, with the graft and
    with the paper's rule (momentum 0.9); its first step is a quarter of the unramped one.

    Kills: an off-by-one ramp (``(k+1)/4``), a ramp never applied or never ending, a ramp
    that also scales the momentum buffer or Adam's moments."""
    x, y = _classes(112, 6)
    kw = dict(graft=graft, momentum=0.0 if graft == "adam" else 0.9, update_freq=3, backoff=0.0)
    warm, hand, plain = _net(6), _net(6), _net(6)
    opt_w = tds.SNOpt(warm, lr=0.03, warmup=4, **kw)
    opt_h = tds.SNOpt(hand, lr=0.03, warmup=0, **kw)
    opt_p = tds.SNOpt(plain, lr=0.03, warmup=0, **kw)
    first = {}
    for k in range(1, 8):
        xb, yb = x[(k - 1) * 16 : k * 16], y[(k - 1) * 16 : k * 16]
        opt_h.param_groups[0]["lr"] = 0.03 * min(1.0, k / 4)
        before = [p.detach().clone() for p in warm.parameters()]
        for model, opt in ((warm, opt_w), (hand, opt_h), (plain, opt_p)):
            _ce_step(model, xb, yb)
            opt.step()
        if k == 1:
            first = {
                "warm": [p.detach() - b for p, b in zip(warm.parameters(), before)],
                "plain": [p.detach() - b for p, b in zip(plain.parameters(), before)],
            }
        for p, q in zip(warm.parameters(), hand.parameters()):
            assert torch.equal(p, q), k
    for dw, dp in zip(first["warm"], first["plain"]):
        torch.testing.assert_close(dw, dp / 4, rtol=1e-12, atol=1e-16)


def test_resume_inside_the_warmup_is_exact():
    resume_is_exact(7, 96, before=2, cut=32, after=5, update_freq=3, warmup=5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"damping": "levenberg"}, r"damping='levenberg'.*accepted: 'relative', 'fixed'"),
        ({"graft": "sgd"}, r"graft='sgd'.*accepted: 'adam', 'none'"),
        ({"betas": (0.9, 1.0)}, r"betas=\(0\.9, 1\.0\)"),
        ({"graft_eps": -1.0}, r"graft_eps=-1\.0"),
        ({"kl_clip": 0.01}, r"kl_clip=0\.01.*graft='none'"),
        ({"warmup": -1}, r"warmup=-1.*int >= 0"),
        ({"warmup": 2.5}, r"warmup=2\.5.*int >= 0"),
        ({"warmup": True}, r"warmup=True.*int >= 0"),
        ({"length_cap": 0.5}, r"length_cap=0\.5.*None \(off\) or a finite float >= 1"),
        ({"length_cap": float("inf")}, r"length_cap=inf"),
        ({"length_cap": True}, r"length_cap=True"),
    ],
)
def test_bad_step_options_raise_and_change_nothing(kwargs, match):
    model = _net(5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        tds.SNOpt(model, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class _Gated(nn.Module):
    """A field whose second layer starts at zero: the first layer's gradient and curvature
    are exactly zero at the first step (as FFJORD's zero-initialised gates)."""

    def __init__(self, dim: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        nn.init.zeros_(self.l2.weight)
        nn.init.zeros_(self.l2.bias)

    def forward(self, t, x, args=None):
        return self.l2(torch.tanh(self.l1(x)))


def test_layer_without_gradient_takes_no_step_and_nothing_is_skipped():
    """Relative damping of an all-zero second moment: ``0/0`` would make every step non-finite
    and skipped (the breast-cancer and circles FFJORD runs of ``bench suite`` stalled at their
    initial loss that way). The zero layer must stay put, the others move, no warning."""
    torch.manual_seed(6)
    node = NeuralODE(_Gated(), sensitivity="snopt", solver="rk4", return_t_eval=False).to(DT)
    t = torch.linspace(0, 1, 3, dtype=DT)
    x = torch.randn(16, 4, dtype=DT)
    opt = tds.SNOpt(node)
    l1 = node.vf.vf.l1.weight.detach().clone()
    l2 = node.vf.vf.l2.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.zero_grad()
        (node(x, t)[-1] - 1).square().mean().backward()
        assert float(node.vf.vf.l1.weight.grad.abs().max()) == 0.0
        opt.step()
    assert torch.equal(node.vf.vf.l1.weight, l1)
    assert not torch.equal(node.vf.vf.l2.weight, l2)
    assert all(torch.isfinite(p).all() for p in node.parameters())
