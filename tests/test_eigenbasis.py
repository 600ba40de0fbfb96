"""Warm-started eigenbasis refresh (``refresh="power"``) against ``torch.linalg.eigh``.

Correctness by iteration count, no timing: factors up to ``EXACT_UP_TO`` wide get ``eigh``
itself; the top-``rank`` subspace step (wider factors) converges to the exact eigenpairs, is
exact where it should be, stays finite and orthonormal with repeated and zero eigenvalues;
SNOpt's checkpoint resume stays exact.
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from torch import Tensor

import torchdyn_snopt as tds
from tests.helpers.data import classification_data
from tests.helpers.models import OdeClassifier
from tests.helpers.training import train_steps
from torchdyn_snopt.curvature.eigenbasis import (
    EXACT_UP_TO,
    POWER_RANK,
    Refresh,
    eigh_exact,
    is_thin,
    is_wide,
    pair_shape,
    parse_refresh,
    refresh_eigh,
    settle,
    sketchable,
    tail_share,
    truncate,
    warm,
)

DT = torch.float64


def _spd(eigenvalues: list[float], seed: int = 0) -> tuple[Tensor, Tensor]:
    """``Q diag(λ) Qᵀ`` with a random orthonormal ``Q``; returns the matrix and ``Q``."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ Q.t(), Q


def _random_basis(n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """A prior unrelated to the matrix: random orthonormal columns, eigenvalues ``10^-i``
    (its tail is light, so a wide factor's refresh starts from it: :func:`warm`)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))[0]
    return 0.1 ** torch.arange(n, dtype=DT), U


def _residual(M: Tensor, lam: Tensor, U: Tensor) -> float:
    """``‖M U − U diag(λ)‖ / ‖M‖``: 0 exactly for eigenpairs."""
    return float((M @ U - U * lam).norm() / M.norm())


def _orthonormality(U: Tensor) -> float:
    return float((U.t() @ U - torch.eye(U.shape[1], dtype=U.dtype)).abs().max())


def _subspace_sine(U: Tensor, V: Tensor) -> float:
    """Largest principal-angle sine between the column spans of orthonormal ``U``, ``V``."""
    return float(torch.linalg.matrix_norm(V - U @ (U.t() @ V), ord=2))


def _power(M: Tensor, prior, steps: int, rank: int):
    """The thin refresh at small sizes: ``exact_up_to=0`` so that any ``n > rank`` is wide."""
    return refresh_eigh(M, prior, Refresh.POWER, steps=steps, rank=rank, exact_up_to=0)


# --------------------------------------------------------------------------- narrow factors


@pytest.mark.parametrize("n", [3, 128, EXACT_UP_TO])
def test_power_decomposes_factors_up_to_exact_up_to_with_eigh(n):
    """Up to ``EXACT_UP_TO`` wide, ``"power"`` is ``eigh`` itself whatever the prior (bit for
    bit: complete basis, values clamped at 0), and the pair shape says so."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, n + 3, generator=g, dtype=DT)
    M = X @ X.t() / n
    want = eigh_exact(M)
    for prior in (None, _random_basis(n), eigh_exact(M + 0.1 * torch.eye(n, dtype=DT))):
        lam, U = refresh_eigh(M, prior, Refresh.POWER)
        torch.testing.assert_close(lam, want[0], rtol=0, atol=0)
        torch.testing.assert_close(U, want[1], rtol=0, atol=0)
    assert pair_shape(n, Refresh.POWER) == (n, n)
    assert not is_wide(n, Refresh.POWER)


def _light_tail(n: int, rank: int) -> list[float]:
    """``rank`` values 1..rank and a tail of ``1e-4`` (far below TAIL_SHARE of the trace)."""
    return [1.0 + i for i in range(rank)] + [1e-4] * (n - rank)


def test_thin_from_just_above_exact_up_to():
    """One column wider than ``EXACT_UP_TO``, a light tail: thin, ``POWER_RANK`` pairs and
    the tail's mean; the pair shape says so once a warm prior exists."""
    n = EXACT_UP_TO + 1
    M, _ = _spd(_light_tail(n, POWER_RANK), seed=11)
    lam, U = refresh_eigh(M, None, Refresh.POWER)
    assert U.shape == (n, POWER_RANK) and lam.shape == (POWER_RANK + 1,)
    assert pair_shape(n, Refresh.POWER, (lam, U)) == (POWER_RANK + 1, POWER_RANK)
    assert pair_shape(n, Refresh.POWER) == (n, n)  # no prior: eigh, settled afterwards
    assert pair_shape(n, Refresh.EXACT, (lam, U)) == (n, n) and is_wide(n, Refresh.POWER)
    top = torch.arange(1.0, POWER_RANK + 1.0, dtype=DT)
    torch.testing.assert_close(lam[:POWER_RANK].sort().values, top)
    torch.testing.assert_close(lam[-1], torch.tensor(1e-4, dtype=DT))
    assert tail_share((lam, U)) < 1e-3


def test_heavy_tailed_wide_factor_keeps_eighs_complete_basis():
    """A flat spectrum (the top 128 of 513 hold 43 % of the trace): ``eigh`` itself without a
    prior; from a light-tailed prior one thin step (the shape was fixed by the prior), whose
    heavy tail sends the next refresh back to ``eigh``; a heavy-tailed thin basis is neither
    warm nor sketched."""
    n = EXACT_UP_TO + 1
    M, _ = _spd([1.0 + i for i in range(n)], seed=11)
    want = eigh_exact(M)
    top = sum(range(n - POWER_RANK + 1, n + 1)) / sum(range(1, n + 1))
    assert tail_share(want) == pytest.approx(1 - top)
    lam, U = refresh_eigh(M, None, Refresh.POWER)
    assert U.shape == (n, n)
    torch.testing.assert_close(lam, want[0], rtol=0, atol=0)
    thin = refresh_eigh(M, _random_basis(n), Refresh.POWER)
    assert thin[1].shape == (n, POWER_RANK) and tail_share(thin) > 0.5
    assert not warm(thin, n) and not sketchable(thin)
    assert pair_shape(n, Refresh.POWER, thin) == (n, n)
    lam, U = refresh_eigh(M, thin, Refresh.POWER)  # from the heavy thin prior: eigh again
    torch.testing.assert_close(lam, want[0], rtol=0, atol=0)
    light = truncate(*eigh_exact(_spd(_light_tail(n, POWER_RANK), seed=3)[0]), POWER_RANK)
    assert warm(light, n) and sketchable(light) and not sketchable(want)


def test_settle_cuts_only_light_tailed_wide_complete_pairs():
    n = 40
    light = eigh_exact(_spd(_light_tail(n, 6), seed=1)[0])
    heavy = eigh_exact(_spd([1.0 + i for i in range(n)], seed=1)[0])
    kw = {"rank": 6, "exact_up_to": 0}
    lam, U = settle(light, Refresh.POWER, **kw)
    assert U.shape == (n, 6) and lam.shape == (7,)
    assert settle(heavy, Refresh.POWER, **kw) is heavy
    assert settle(light, Refresh.EXACT, **kw) is light
    assert settle(light, Refresh.POWER, rank=6, exact_up_to=n) is light  # not wide
    assert settle((lam, U), Refresh.POWER, **kw)[1] is U  # already thin


# --------------------------------------------------------------------------- top subspace


def test_top_subspace_converges_and_tail_is_its_mean():
    """40 wide, rank 6: the 6 leading directions converge to eigh's (angle falls with the
    step count); the result is thin (40 × 6 orthonormal, 7 values, the last the tail's mean)."""
    eigenvalues = [10.0 * 0.5**i for i in range(6)] + [0.01 * (1 + i / 34) for i in range(34)]
    M, _ = _spd(eigenvalues, seed=7)
    exact_U = torch.linalg.eigh(M).eigenvectors[:, -6:]
    prior = _random_basis(40)
    angles = []
    for steps in (1, 2, 3, 30):
        lam, U = _power(M, prior, steps, rank=6)
        assert U.shape == (40, 6) and lam.shape == (7,) and is_thin(U)
        angles.append(_subspace_sine(U, exact_U))
        assert _orthonormality(U) < 1e-13
    assert angles[0] > angles[1] > angles[2] > angles[3], angles
    assert angles[-1] < 1e-10
    tail = torch.tensor(eigenvalues[6:], dtype=DT).mean()
    torch.testing.assert_close(lam[6], tail, rtol=1e-8, atol=0)
    torch.testing.assert_close(lam[:6].sort().values, torch.linalg.eigvalsh(M)[-6:])
    torch.testing.assert_close(M @ U, U * lam[:6], rtol=0, atol=1e-10)  # Ritz pairs: exact


def test_top_subspace_warm_starts_from_a_thin_prior():
    """A thin prior (the previous power refresh's) is used as is: one step from the exact
    top subspace of a slightly drifted factor beats the stale subspace."""
    eigenvalues = [10.0 * 0.6**i for i in range(8)] + [0.01] * 32
    M, _ = _spd(eigenvalues, seed=4)
    g = torch.Generator().manual_seed(6)
    E = torch.randn(40, 40, generator=g, dtype=DT)
    drifted = M + 1e-2 * (E + E.t())
    prior = _power(M, None, 1, rank=8)  # first refresh: truncated eigh
    assert prior[1].shape == (40, 8)
    want = torch.linalg.eigh(drifted).eigenvectors[:, -8:]
    lam, U = _power(drifted, prior, 1, rank=8)
    assert U.shape == (40, 8)
    assert _subspace_sine(U, want) < 0.5 * _subspace_sine(prior[1], want)


def test_first_wide_refresh_truncates_eigh():
    """No prior, 30 wide, rank 5, a light tail: eigh's top 5 pairs and the mean of the other
    25 values."""
    eigenvalues = [float(100 - 10 * i) for i in range(5)] + [0.01 * (25 - i) for i in range(25)]
    M, _ = _spd(eigenvalues, seed=8)
    lam, U = _power(M, None, 1, rank=5)
    exact = torch.linalg.eigh(M)
    torch.testing.assert_close(lam[:5].sort().values, exact.eigenvalues[-5:])
    torch.testing.assert_close(lam[5], torch.tensor(eigenvalues[5:], dtype=DT).mean())
    assert _subspace_sine(U, exact.eigenvectors[:, -5:]) < 1e-10
    kw = {"rank": 5, "exact_up_to": 0}
    assert pair_shape(30, Refresh.POWER, (lam, U), **kw) == (6, 5)
    assert pair_shape(30, Refresh.POWER, None, **kw) == (30, 30)
    assert pair_shape(30, Refresh.EXACT, (lam, U), **kw) == (30, 30)
    assert pair_shape(5, Refresh.POWER, (lam, U), **kw) == (5, 5)


def test_diagonal_wide_factor_is_exact_in_one_step():
    """A diagonal 20-wide factor (values a permutation of 0..19), rank 4, from a prior whose
    leading columns span the top 4 coordinates (exactly, or rotated within them): the top 4
    eigenpairs and the tail's mean (7.5) come out exact in one step."""
    d = torch.tensor([float((7 * i) % 20) for i in range(20)], dtype=DT)
    M = torch.diag(d)
    top = torch.topk(d, 4).indices
    R = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(3), dtype=DT))[0]
    rotated = torch.eye(20, dtype=DT)
    rotated[:, top] = rotated[:, top] @ R
    prior_values = torch.where(d >= 16, d, 1e-6 * d)  # d's order, a light tail (warm)
    for U0 in (torch.eye(20, dtype=DT), rotated):
        lam, U = _power(M, (prior_values, U0), 1, rank=4)
        torch.testing.assert_close(M @ U, U * lam[:4], rtol=0, atol=1e-13)
        want = torch.tensor([16.0, 17.0, 18.0, 19.0], dtype=DT)
        torch.testing.assert_close(lam[:4].sort().values, want, rtol=0, atol=1e-13)
        torch.testing.assert_close(lam[4], torch.tensor(7.5, dtype=DT), rtol=1e-15, atol=0)
        assert _orthonormality(U) < 1e-15


def test_top_subspace_of_a_low_rank_factor_reconstructs_it():
    """Rank 4 (with a repeated eigenvalue) below the tracked rank 6, 30 wide: the tail's
    value is 0 and ``V diag(μ) Vᵀ + tail·(I − V Vᵀ)`` is the factor."""
    M, _ = _spd([4.0, 4.0, 1.0, 0.5] + [0.0] * 26, seed=2)
    lam, U = _power(M, _random_basis(30), 1, rank=6)
    assert torch.isfinite(U).all() and _orthonormality(U) < 1e-13
    torch.testing.assert_close(lam[6], torch.zeros((), dtype=DT), rtol=0, atol=1e-14)
    Q = torch.eye(30, dtype=DT) - U @ U.t()
    torch.testing.assert_close(U @ torch.diag(lam[:6]) @ U.t() + lam[6] * Q, M, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 40])
def test_wide_repeated_and_zero_eigenvalues_stay_finite(steps):
    """Rank 4 tracked in a 24-wide factor whose values repeat across the cut (3 x 5, then
    2 x 6, then zeros): finite, orthonormal, non-negative; the tracked subspace is an
    invariant subspace after enough steps."""
    M, _ = _spd([5.0] * 3 + [2.0] * 6 + [0.0] * 15, seed=9)
    lam, U = _power(M, _random_basis(24), steps, rank=4)
    assert torch.isfinite(lam).all() and torch.isfinite(U).all() and (lam >= 0).all()
    assert _orthonormality(U) < 1e-13
    torch.testing.assert_close(lam.sum() - lam[4] + 20 * lam[4], M.trace())  # trace kept
    if steps == 40:
        torch.testing.assert_close(M @ U, U * lam[:4], rtol=0, atol=1e-9)


def test_first_refresh_and_exact_mode_use_eigh():
    M, _ = _spd([3.0, 2.0, 1.0])
    want = eigh_exact(M)
    for prior, mode in ((None, Refresh.POWER), (_random_basis(3), Refresh.EXACT)):
        got = refresh_eigh(M, prior, mode)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    other_shape = _random_basis(4)
    torch.testing.assert_close(refresh_eigh(M, other_shape, Refresh.POWER)[0], want[0])


def test_dtype_and_device_follow_the_factor():
    M, _ = _spd([2.0, 1.0, 0.5, 0.25])
    lam, U = refresh_eigh(M.float(), _random_basis(4), Refresh.POWER)
    assert lam.dtype == U.dtype == torch.float32
    lam, U = refresh_eigh(M.float(), _random_basis(4), Refresh.POWER, rank=2)
    assert lam.dtype == U.dtype == torch.float32


# --------------------------------------------------------------------------- the optimizer


def _data():
    return classification_data(64, 0, DT)


def _model(seed: int = 0) -> OdeClassifier:
    torch.manual_seed(seed)
    return OdeClassifier().to(DT)


@pytest.mark.parametrize("refresh", ["power", Refresh.POWER])
def test_power_refresh_resume_is_bit_identical(refresh):
    """Train 4 steps (refreshes at 0 and 3, then 6), save, continue 5; a fresh optimizer
    loaded from the save continues the same (thin bases: ``tests/test_thin_basis.py``)."""
    x, y = _data()
    model = _model()
    kw = {"lr": 0.05, "update_freq": 3, "full_precond": True, "refresh": refresh}
    opt = tds.SNOpt(model, **kw)
    assert opt.preconditioner.refresh is Refresh.POWER
    train_steps(model, opt, 4, x, y)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert all({"lamA", "lamB"} <= set(v) for v in saved_opt["preconditioner"]["layers"].values())
    train_steps(model, opt, 5, x, y, start=4)
    ref = [p.detach().clone() for p in model.parameters()]

    resumed = _model(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = tds.SNOpt(resumed, **kw)
    opt2.load_state_dict(saved_opt)
    train_steps(resumed, opt2, 5, x, y, start=4)
    for p, r in zip(resumed.parameters(), ref):
        assert torch.equal(p.detach(), r)


def test_power_refresh_trains_exactly_like_exact_on_narrow_factors():
    """Every factor of the small classifier is at most ``EXACT_UP_TO`` wide: ``"power"``
    takes the same steps as ``"exact"``, bit for bit."""
    x, y = _data()
    params = {}
    for refresh in ("exact", "power"):
        model = _model()
        opt = tds.SNOpt(model, lr=0.05, update_freq=2, full_precond=True, refresh=refresh)
        train_steps(model, opt, 6, x, y)
        params[refresh] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(params["exact"], params["power"]))


def test_old_checkpoint_without_eigenvalues_still_loads():
    x, y = _data()
    model = _model()
    opt = tds.SNOpt(model, lr=0.05, update_freq=2, full_precond=True, refresh="power")
    train_steps(model, opt, 2, x, y)
    state = copy.deepcopy(opt.state_dict())
    for layer in state["preconditioner"]["layers"].values():
        del layer["lamA"], layer["lamB"]
    opt2 = tds.SNOpt(model, lr=0.05, update_freq=2, full_precond=True, refresh="power")
    opt2.load_state_dict(state)
    train_steps(model, opt2, 3, x, y, start=2)  # the refresh at 2 falls back to exact
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bad", ["Power", "eigh", 1, None])
@pytest.mark.parametrize("cls", ["SNOpt", "SNOptPreconditioner"])
def test_bad_refresh_raises_before_any_change(bad, cls):
    model = _model()
    state = copy.deepcopy(model.state_dict())
    kwargs = {"lr": 0.1} if cls == "SNOpt" else {}
    with pytest.raises(ValueError, match=r"refresh=.*accepted: 'exact', 'power'"):
        getattr(tds, cls)(model, refresh=bad, **kwargs)
    assert all(not m._forward_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_refresh_is_keyword_only_and_accepts_strings():
    assert parse_refresh("exact") is Refresh.EXACT and parse_refresh(Refresh.POWER) is Refresh.POWER
    assert Refresh.POWER == "power"
    for cls in (tds.SNOpt, tds.SNOptPreconditioner):
        param = inspect.signature(cls).parameters["refresh"]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is Refresh.EXACT


# --------------------------------------------------------------------------- the bench


def test_bench_refresh_cost_quick_writes_json_and_png(tmp_path, capsys):
    from torchdyn_snopt.__main__ import main

    argv = ["bench", "refresh-cost", "--quick", "--widths", "8,16", "--channels", "2"]
    assert main([*argv, "--repeats", "1", "--out", str(tmp_path)]) == 0
    assert "ratio" in capsys.readouterr().out
    data = json.loads((tmp_path / "refresh_cost.json").read_text())
    rows = data["summary"]
    assert data["environment"]["command"]
    assert [(r["field"], r["width"]) for r in rows] == [("mlp", 8), ("mlp", 16), ("conv", 2)]
    variants = ("adam", "not_armed", "not_armed_power", "armed_exact", "armed_power")
    for r in rows:
        for v in variants:
            assert r[f"{v}_s"] > 0
        u = data["config"]["update_freq"]
        for v, between in (("exact", "not_armed"), ("power", "not_armed_power")):
            want = ((u - 1) * r[f"{between}_s"] + r[f"armed_{v}_s"]) / u
            assert r[f"amortized_{v}_s"] == pytest.approx(want)
            assert r[f"amortized_{v}_ratio"] == pytest.approx(want / r["adam_s"])
        for v in ("exact", "power"):
            assert r[f"factor_bytes_{v}"] > 0 and r[f"eigenbasis_bytes_{v}"] > 0
    png = (tmp_path / "refresh_cost.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
