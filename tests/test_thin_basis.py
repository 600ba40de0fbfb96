"""Thin eigenbases (``refresh="power"`` on factors wider than ``EXACT_UP_TO``) against dense truth.

The preconditioner never forms the complement of a thin basis ``V``: it applies the complete
Householder basis ``H = I − W T Wᵀ`` of ``V``'s QR as an operator. The truth here forms that
``H`` explicitly with LAPACK's ``orgqr`` (``torch.linalg.householder_product``), runs the dense
EKFAC formula of eq. 14 (``G' = U_Bᵀ G U_A``, ``P = U_B (G' / D) U_Aᵀ``) and compares.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchdyn.core import NeuralODE

import torchdyn_snopt as tds
from tests.helpers.data import classification_data, conv_data
from tests.helpers.models import OdeClassifier, conv_field
from tests.helpers.training import train_steps
from torchdyn_snopt.config import Damping
from torchdyn_snopt.curvature.base import second_moment, sketch_moment, sketch_of
from torchdyn_snopt.curvature.eigenbasis import (
    EXACT_UP_TO,
    POWER_RANK,
    TAIL_SHARE,
    eigh_exact,
    from_sketch,
    refresh_eigh,
    tail_share,
)
from torchdyn_snopt.curvature.linear import LinearAdapter
from torchdyn_snopt.curvature.source import Factors
from torchdyn_snopt.layer_state import Eigenbasis, Householder, LayerState

DT = torch.float64


def _orthonormal(n: int, k: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=DT))[0]


def _complete(V: Tensor) -> Tensor:
    """The explicit ``n × n`` Householder basis of ``V``'s QR (LAPACK's orgqr)."""
    n, k = V.shape
    if k == n:
        return V
    a, tau = torch.geqrf(V)
    return _orgqr(a, tau)


def _orgqr(a: Tensor, tau: Tensor) -> Tensor:
    n, k = a.shape
    full = torch.zeros(n, n, dtype=a.dtype)
    full[:, :k] = a
    return torch.linalg.householder_product(full, torch.cat([tau, tau.new_zeros(n - k)]))


def _layer(d_out: int, d_in: int, seed: int) -> tuple[nn.Linear, LinearAdapter]:
    """A linear layer (``d_in − 1`` inputs plus the bias) with a random gradient."""
    torch.manual_seed(seed)
    lin = nn.Linear(d_in - 1, d_out).to(DT)
    lin.weight.grad = torch.randn_like(lin.weight)
    lin.bias.grad = torch.randn_like(lin.bias)
    return lin, LinearAdapter(lin, "lin")


CASES = [  # (d_out, d_in, k_B, k_A): thin A, thin B, both thin
    (7, 13, 7, 4),
    (12, 6, 5, 6),
    (11, 9, 3, 4),
]


def test_householder_basis_is_orthonormal_and_starts_with_v():
    V = _orthonormal(10, 3, 0)
    H = _complete(V)
    assert float((H.t() @ H - torch.eye(10, dtype=DT)).abs().max()) < 1e-14
    torch.testing.assert_close((H[:, :3] * V).sum(0).abs(), torch.ones(3, dtype=DT))
    X = torch.randn(10, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    op = Householder(V)
    torch.testing.assert_close(op.t_left(X), H.t() @ X)
    torch.testing.assert_close(op.left(X), H @ X)
    torch.testing.assert_close(op.right(X.t()), X.t() @ H)
    torch.testing.assert_close(op.t_right(X.t()), X.t() @ H.t())


def test_householder_with_identity_reflectors():
    """Coordinate vectors make LAPACK's reflectors the identity (τ = 0): still orthonormal."""
    V = torch.eye(9, dtype=DT)[:, [0, 1, 2]]
    op = Householder(V)
    H = op.left(torch.eye(9, dtype=DT))
    assert float((H.t() @ H - torch.eye(9, dtype=DT)).abs().max()) < 1e-15
    torch.testing.assert_close(H[:, :3].abs(), V)


@pytest.mark.parametrize("d_out,d_in,kB,kA", CASES)
@pytest.mark.parametrize("damping", [Damping.FIXED, Damping.RELATIVE])
@pytest.mark.parametrize("weight_decay", [0.0, 0.03])
def test_thin_step_equals_dense_ekfac_in_the_householder_basis(
    d_out, d_in, kB, kA, damping, weight_decay
):
    lin, adapter = _layer(d_out, d_in, seed=d_out + d_in)
    UA, UB = _orthonormal(d_in, kA, 1), _orthonormal(d_out, kB, 2)
    g = torch.Generator().manual_seed(3)
    m0 = torch.rand(d_out, d_in, generator=g, dtype=DT) + 0.1
    state = LayerState(adapter, Eigenbasis(UA, UB, m0.clone()))
    assert state.eigen.thin
    batch, alpha, eps = 16, 0.7, 0.2
    step = state.propose(batch, alpha, eps, weight_decay, damping)

    FA, FB = _complete(UA), _complete(UB)  # dense truth
    G = adapter.grad_matrix()
    G1 = FB.t() @ G @ FA
    m = alpha * m0 + (1 - alpha) * batch * G1.square()
    if weight_decay:
        G1 = G1 + weight_decay * FB.t() @ adapter.param_matrix() @ FA
    P = FB @ (G1 / LayerState.damped(m, eps, weight_decay, damping)) @ FA.t()

    torch.testing.assert_close(step.P, P, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(step.m, m)
    assert torch.equal(step.G, G)  # the raw gradient, without weight decay


def test_fresh_second_moment_gives_the_tail_value_to_every_complement_direction():
    lam_a, UA = torch.tensor([3.0, 2.0, 0.5], dtype=DT), _orthonormal(6, 2, 0)
    lam_b, UB = torch.tensor([1.0, 4.0, 5.0, 7.0], dtype=DT), _orthonormal(4, 4, 1)
    f = Factors(torch.eye(6, dtype=DT), torch.eye(4, dtype=DT), locations=3)
    e = Eigenbasis.from_pairs(f, (lam_a, UA), (lam_b, UB))
    want_a = torch.tensor([3.0, 2.0, 0.5, 0.5, 0.5, 0.5], dtype=DT)
    torch.testing.assert_close(e.m, 3 * torch.outer(lam_b, want_a))


# --------------------------------------------------------------------------- the optimizer

WIDE = EXACT_UP_TO + 32  # the ODE field's hidden width: both of its factors are thin


def _data():
    return classification_data(64, 0, DT)


def _model(seed: int = 0) -> OdeClassifier:
    torch.manual_seed(seed)
    return OdeClassifier(hidden=WIDE).to(DT)


def _kw(**over):
    return {"lr": 0.05, "update_freq": 3, "full_precond": True, "refresh": "power", **over}


def test_power_keeps_thin_bases_and_small_state():
    x, y = _data()
    model = _model()
    opt = tds.SNOpt(model, **_kw())
    train_steps(model, opt, 4, x, y)
    layers = opt.state_dict()["preconditioner"]["layers"]
    shapes = {n: {k: tuple(v.shape) for k, v in e.items()} for n, e in layers.items()}
    thin = [n for n, s in shapes.items() if s["UA"][1] < s["UA"][0] or s["UB"][1] < s["UB"][0]]
    assert len(thin) == 2, shapes
    for name in thin:
        s = shapes[name]
        assert POWER_RANK in (s["UA"][1], s["UB"][1])
        assert s["m"] == (s["UB"][0], s["UA"][0])


@pytest.mark.parametrize("saved", [3, 4])
def test_thin_resume_is_bit_identical(saved):
    """Refreshes at 0 (eigh, cut to thin), 3 and 6 (from sketches of the saved thin bases):
    saved after 3 steps (armed: the sources sketch with the loaded bases) or 4, continued
    to 9; a fresh optimizer loaded from the save continues the same."""
    x, y = _data()
    model = _model()
    opt = tds.SNOpt(model, **_kw())
    train_steps(model, opt, saved, x, y)
    assert opt.preconditioner.armed is (saved == 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train_steps(model, opt, 9 - saved, x, y, start=saved)
    ref = [p.detach().clone() for p in model.parameters()]

    resumed = _model(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = tds.SNOpt(resumed, **_kw())
    opt2.load_state_dict(saved_opt)
    train_steps(resumed, opt2, 9 - saved, x, y, start=saved)
    for p, r in zip(resumed.parameters(), ref):
        assert torch.equal(p.detach(), r)


def test_thin_state_with_a_wrong_m_shape_is_refused():
    x, y = _data()
    model = _model()
    opt = tds.SNOpt(model, **_kw())
    train_steps(model, opt, 1, x, y)
    state = copy.deepcopy(opt.state_dict())
    layers = state["preconditioner"]["layers"]
    e = next(e for e in layers.values() if e["UB"].shape[1] < e["UB"].shape[0])
    e["m"] = e["m"][:-1]  # one row short
    with pytest.raises(ValueError, match="m has shape"):
        tds.SNOpt(_model(), **_kw()).load_state_dict(state)


def test_power_with_thin_bases_trains_like_exact(monkeypatch):
    """Hidden width 160 made thin (``exact_up_to`` 128: rank 128 of 160/161): the full-batch
    loss after 9 steps falls as far as with eigh's complete bases (measured 0.6023 vs 0.6022).
    At 544 wide power ends at 0.728 against exact's 0.638, but these factors have rank 80
    (16 samples, 5 nodes), so both bases hold an arbitrary null space, where EKFAC's
    per-direction moments differ: rotating exact's null space at random gives 0.660-0.767."""
    monkeypatch.setitem(refresh_eigh.__kwdefaults__, "exact_up_to", POWER_RANK)
    x, y = _data()
    losses = {}
    for refresh in ("exact", "power"):
        torch.manual_seed(0)
        model = OdeClassifier(hidden=POWER_RANK + 32).to(DT)
        opt = tds.SNOpt(model, **_kw(refresh=refresh, update_freq=2))
        train_steps(model, opt, 9, x, y)
        thin = [s.eigen.thin for s in opt.preconditioner.layers.values()]
        assert any(thin) == (refresh == "power")  # the patched cut did make them thin
        with torch.no_grad():
            losses[refresh] = F.cross_entropy(model(x), y).item()
    assert losses["power"] < 0.7, losses
    assert abs(losses["power"] - losses["exact"]) < 0.05 * losses["exact"], losses


# --------------------------------------------------------------------------- sketched factors


def _spd(eigenvalues: list[float], seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ Q.t(), Q


def _sine(U: Tensor, V: Tensor) -> float:
    return float(torch.linalg.matrix_norm(V - U @ (U.t() @ V), ord=2))


def test_sketch_moment_is_the_moment_times_the_probe_and_its_diagonal():
    rows = torch.randn(37, 11, generator=torch.Generator().manual_seed(0), dtype=DT)
    probe = _orthonormal(11, 4, 1)
    M = rows.t() @ rows / 37
    want = torch.cat([M @ probe, M.diagonal()[:, None]], 1)
    torch.testing.assert_close(sketch_moment(rows, probe), want)
    torch.testing.assert_close(sketch_of(M, probe), want)
    assert torch.equal(sketch_moment(rows, None), second_moment(rows))


def test_from_sketch_is_the_nystrom_approximation():
    """Dense truth: the eigenpairs of ``F Ω (Ωᵀ F Ω)⁻¹ Ωᵀ F`` (nonzero ones) and the tail
    ``(tr F − Σ λ) / (n − k)``."""
    F, _ = _spd([9.0, 7.0, 4.0, 3.0, 1.0, 0.5] + [0.1] * 14, seed=2)
    probe = _orthonormal(20, 5, 3)
    lam, U = from_sketch(sketch_of(F, probe), probe)
    Y = F @ probe
    nystrom = Y @ torch.linalg.solve(probe.t() @ Y, Y.t())
    want_lam, want_U = torch.linalg.eigh(nystrom)
    torch.testing.assert_close(lam[:5].sort().values, want_lam[-5:], rtol=1e-9, atol=1e-12)
    assert _sine(U, want_U[:, -5:]) < 1e-8
    torch.testing.assert_close(lam[5], (F.trace() - want_lam[-5:].sum()) / 15)
    assert _orthonormality(U) < 1e-13


def _orthonormality(U: Tensor) -> float:
    return float((U.t() @ U - torch.eye(U.shape[1], dtype=U.dtype)).abs().max())


def test_repeated_sketch_refreshes_converge_to_the_top_eigenbasis():
    """On a fixed factor, each refresh from the sketch of the previous basis: the angle to
    the exact top-6 subspace falls with the refresh count, and the values converge."""
    eigenvalues = [10.0 * 0.6**i for i in range(6)] + [0.3 * 0.97**i for i in range(34)]
    F, _ = _spd(eigenvalues, seed=7)
    exact = torch.linalg.eigh(F)
    U = _orthonormal(40, 6, 8)
    angles = []
    for _ in range(40):
        lam, U = from_sketch(sketch_of(F, U), U)
        angles.append(_sine(U, exact.eigenvectors[:, -6:]))
    assert angles[0] > angles[2] > angles[5] > angles[15], angles[:16]
    assert angles[-1] < 1e-10
    torch.testing.assert_close(lam[:6].sort().values, exact.eigenvalues[-6:])
    torch.testing.assert_close(lam[6], exact.eigenvalues[:-6].mean())


def test_from_sketch_of_a_diagonal_factor_is_exact():
    """Probe spanning the top coordinates (rotated within them): exact pairs and tail."""
    d = torch.tensor([float((7 * i) % 20) for i in range(20)], dtype=DT)
    top = torch.topk(d, 4).indices
    probe = torch.eye(20, dtype=DT)[:, top] @ _orthonormal(4, 4, 3)
    lam, U = from_sketch(sketch_of(torch.diag(d), probe), probe)
    torch.testing.assert_close(torch.diag(d) @ U, U * lam[:4], rtol=0, atol=1e-12)
    torch.testing.assert_close(lam[:4].sort().values, torch.tensor([16.0, 17, 18, 19], dtype=DT))
    torch.testing.assert_close(lam[4], torch.tensor(7.5, dtype=DT))


@pytest.mark.parametrize("kind", ["repeated", "zero", "rank-deficient"])
def test_from_sketch_with_repeated_and_zero_eigenvalues_stays_finite(kind):
    values = {
        "repeated": [5.0] * 4 + [2.0] * 6 + [1.0] * 14,
        "zero": [3.0, 2.0] + [0.0] * 22,  # F Ω has rank 2 < k = 5
        "rank-deficient": [0.0] * 24,
    }[kind]
    F, _ = _spd(values, seed=11)
    probe = _orthonormal(24, 5, 12)
    lam, U = from_sketch(sketch_of(F, probe), probe)
    assert U.shape == (24, 5) and lam.shape == (6,)
    assert torch.isfinite(lam).all() and torch.isfinite(U).all() and (lam >= 0).all()
    assert _orthonormality(U) < 1e-12
    if kind == "zero":  # the two nonzero directions are found exactly (they are in span(FΩ))
        torch.testing.assert_close(lam[:5].sort().values[-2:], torch.tensor([2.0, 3.0], dtype=DT))
        torch.testing.assert_close(lam[5], torch.zeros((), dtype=DT), atol=1e-12, rtol=0)
    if kind == "rank-deficient":
        assert float(lam.abs().max()) == 0.0


def test_refresh_from_sampled_sketch_equals_refresh_from_the_factor():
    """Two identical runs, one whose ODE sources sample the complete factors: at the
    second refresh the sketch is the complete factor's ``[F Ω, diag F]`` (to rounding) and
    the refreshed thin eigenpairs reconstruct the complete factor (its rank, at most the
    sampled rows, is below the 128 tracked directions, so the Nyström approximation is exact)."""
    x, y = _data()
    runs = []
    for sketch in (True, False):
        model = _model()
        opt = tds.SNOpt(model, **_kw())
        if not sketch:
            opt.preconditioner._probes = dict  # type: ignore[method-assign]
        train_steps(model, opt, 4, x, y)  # refreshes at 0 (complete) and 3
        runs.append(opt.preconditioner)
    sketched, complete = runs
    thin = 0
    for name, f in sketched.last_factors.items():
        g = complete.last_factors[name]
        for probe, S, M in ((f.probe_A, f.A, g.A), (f.probe_B, f.B, g.B)):
            if probe is None:
                torch.testing.assert_close(S, M)
            else:
                thin += 1
                torch.testing.assert_close(S, sketch_of(M, probe), rtol=1e-9, atol=1e-12)
    assert thin == 2
    for a, state in sketched.layers.items():
        g = complete.last_factors[a.name]
        e = state.eigen
        for lam, U, M in ((e.lamA, e.UA, g.A), (e.lamB, e.UB, g.B)):
            if lam is not None and U.shape[1] < U.shape[0]:  # rank F < 128: Nyström is exact
                assert torch.linalg.matrix_rank(M) < U.shape[1]
                Q = torch.eye(U.shape[0], dtype=DT) - U @ U.t()
                recon = U @ torch.diag(lam[:-1]) @ U.t() + lam[-1] * Q
                torch.testing.assert_close(recon, M, rtol=0, atol=1e-10 * float(M.abs().max()))
    assert not any(
        f.probe_A is not None or f.probe_B is not None for f in complete.last_factors.values()
    )


def test_power_keeps_eighs_complete_bases_where_the_tail_is_heavy(monkeypatch):
    """A 400-d state fed by 400-d Gaussian inputs (256 samples, full batch): the 401-wide
    input factors of the encoder and the field spread their trace (far more than
    ``TAIL_SHARE`` outside the top 128), so ``"power"`` keeps ``eigh``'s complete bases for
    them, while the field's 400-wide output factor (gradients from a 3-class head:
    numerically low rank) is thin."""
    monkeypatch.setitem(refresh_eigh.__kwdefaults__, "exact_up_to", POWER_RANK)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 400, generator=g, dtype=DT)
    y = (x[:, :200].sum(1) > 0).long() + (x[:, 200] > 1).long()
    torch.manual_seed(0)
    model = OdeClassifier(d_in=400, dim=400, hidden=8).to(DT)
    opt = tds.SNOpt(model, **_kw(update_freq=2))
    complete, thin = [], []
    for step in range(5):  # refreshes at 0, 2, 4
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % 2:
            continue
        layers = {a.name: s.eigen for a, s in opt.preconditioner.layers.items()}
        for name, f in opt.preconditioner.last_factors.items():
            for side, M in (("A", f.A), ("B", f.B)):
                U = getattr(layers[name], "U" + side)
                if M.shape[0] > POWER_RANK:  # a sketch (n × 129) of a thin side: its own share
                    lam = getattr(layers[name], "lam" + side)
                    share = tail_share(eigh_exact(M) if M.shape[1] == M.shape[0] else (lam, U))
                    (thin if U.shape[1] < U.shape[0] else complete).append((name, side, share))
                    if U.shape[1] == U.shape[0]:
                        assert torch.equal(U, eigh_exact(M)[1])  # eigh's own basis
    heavy = {(n, s) for n, s, _ in complete}
    assert {("enc", "A"), ("ode.vf.vf.l1", "A")} <= heavy, complete
    assert all(share > TAIL_SHARE for *_, share in complete), complete
    assert ("ode.vf.vf.l2", "B") in {(n, s) for n, s, _ in thin}, thin
    assert all(share < TAIL_SHARE for *_, share in thin[-1:]), thin


def test_power_leaves_wide_convolutions_to_eigh(monkeypatch):
    """A 16-channel conv field (145-wide input factors, wide once the cut is patched to 128):
    ``"power"`` keeps ``eigh``'s complete bases for convolutions (``thin_bases`` False) and
    trains bit for bit like ``"exact"``."""
    monkeypatch.setitem(refresh_eigh.__kwdefaults__, "exact_up_to", POWER_RANK)
    x = conv_data(8, 16, 6)
    target = conv_data(8, 16, 6, seed=5)
    params = {}
    for refresh in ("exact", "power"):
        ode = NeuralODE(conv_field(16), sensitivity="snopt", solver="rk4")
        opt = tds.SNOpt(ode, lr=0.05, update_freq=2, refresh=refresh)
        for _ in range(5):  # refreshes at 0, 2, 4
            opt.zero_grad()
            ((ode(x, torch.linspace(0, 1, 3))[1][-1] - target) ** 2).mean().backward()
            opt.step()
        widths = [s.eigen.UA.shape for s in opt.preconditioner.layers.values()]
        assert widths == [(145, 145), (145, 145)], widths
        params[refresh] = [p.detach().clone() for p in ode.parameters()]
    for p, q in zip(params["exact"], params["power"]):
        assert torch.equal(p, q)
