"""SNOpt's ``backoff``: the rate's factor by hand, its floor and ceiling, its behaviour on a
least-squares problem inside a linear ODE, resume and bad values."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchdyn.core import NeuralODE

import torchdyn_snopt as tds
from tests.test_defaults import DT, _ce_step, _classes, _net, _train, resume_is_exact

FLOOR = 0.01

#: loss factors of the stream: alternating signs reverse the gradient (the next gradient
#: opposes the last step, cos > 0: the factor shrinks), then agreeing ones let it recover
#: (the first reversal falls inside the warmup of 3 steps, where the factor must not move)
_SIGNS = (1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, 1.0)


def _signed_step(model, x, y, sign):
    model.zero_grad()
    (sign * F.cross_entropy(model(x), y)).backward()


@pytest.mark.parametrize(
    ("graft", "beta"), [("adam", 0.5), ("none", 0.5), ("adam", 50.0)]
)  # fmt: skip
def test_backoff_is_the_rate_set_by_hand(graft, beta):
    """``backoff=β`` takes the steps of ``backoff=0`` whose rate is set by hand to ``lr·f``
    before each step, with ``f ← min(1, max(0.01, f·exp(−β·cos(g, Δ))))`` from the hand run's
    own raw gradient ``g`` and last parameter change ``Δ``, unchanged inside the warmup (3
    steps, the third reversed); with the graft and with the paper's rule (momentum 0.9),
    thirteen steps. Measured difference up to 1e-12 (the paper's rule, whose weights grow to
    ~8 and whose steps amplify rounding: the two runs round ``lr·f·d`` in a different order);
    bound 1e-11. The factor falls below 1 after the reversed steps and, with the graft, is
    back at its ceiling 1 by the end; with β = 50 it reaches its floor 0.01.

    Kills: the sign of the cosine (the rate grows on a reversal), the cosine against the
    preconditioned instead of the raw gradient, no ceiling or floor, the factor updated
    inside the warmup, the factor also scaling the momentum buffer or Adam's moments."""
    x, y = _classes(16 * len(_SIGNS), 3)
    lr, warmup = 0.03, 3
    kw = dict(graft=graft, momentum=0.0 if graft == "adam" else 0.9, update_freq=3)
    back, hand = _net(3), _net(3)
    opt_b = tds.SNOpt(back, lr=lr, warmup=warmup, backoff=beta, **kw)
    opt_h = tds.SNOpt(hand, lr=lr, warmup=warmup, backoff=0.0, **kw)
    factor, factors, last = 1.0, [], None
    for k, sign in enumerate(_SIGNS, start=1):
        xb, yb = x[(k - 1) * 16 : k * 16], y[(k - 1) * 16 : k * 16]
        _signed_step(back, xb, yb, sign)
        _signed_step(hand, xb, yb, sign)
        g = [p.grad.clone() for p in hand.parameters()]
        if k > warmup and last is not None:
            dot = sum(float((a * d).sum()) for a, d in zip(g, last))
            norms = math.sqrt(sum(float(a.square().sum()) for a in g)) * math.sqrt(
                sum(float(d.square().sum()) for d in last)
            )
            factor = min(1.0, max(FLOOR, factor * math.exp(-beta * dot / norms)))
        factors.append(factor)
        opt_h.param_groups[0]["lr"] = lr * factor
        before = [p.detach().clone() for p in hand.parameters()]
        opt_b.step()
        opt_h.step()
        last = [p.detach() - b for p, b in zip(hand.parameters(), before)]
        for p, q in zip(back.parameters(), hand.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-11)
        owner = next(iter(back.parameters()))
        assert float(opt_b.state[owner]["rate_factor"]) == pytest.approx(factor, rel=1e-12)
    assert factors[:warmup] == [1.0] * warmup
    if beta > 1:
        assert min(factors) == FLOOR, factors
    else:
        assert FLOOR < min(factors) < 0.97, factors
        assert graft == "none" or factors[-1] == 1.0, factors


class _AffineField(nn.Module):
    """``d/dt [x, z] = [W·z + b, 0]``: ``x(1) = x(0) + W·z + b``, affine in ``(W, b)``."""

    def __init__(self, dim: int, features: int) -> None:
        super().__init__()
        self.dim = dim
        self.lin = nn.Linear(features, dim)

    def forward(self, t, s, args=None):
        z = s[:, self.dim :]
        return torch.cat([self.lin(z), torch.zeros_like(z)], 1)


def _quadratic(seed: int):
    """Least squares in ``(W, b)`` through a linear ODE (rk4): a convex quadratic, minimum 0."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(64, 5, generator=g, dtype=DT)
    x0 = torch.randn(64, 3, generator=g, dtype=DT)
    target = x0 + z @ torch.randn(5, 3, generator=g, dtype=DT) + 0.3
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdyn's notices
        node = NeuralODE(_AffineField(3, 5), sensitivity="snopt", solver="rk4", return_t_eval=False)
    node = node.to(DT)
    t = torch.linspace(0, 1, 3, dtype=DT)
    s0 = torch.cat([x0, z], 1)
    return node, lambda: (node(s0, t)[-1][:, :3] - target).square().mean()


def _fit(beta: float, lr: float, steps: int, seed: int):
    node, loss_fn = _quadratic(seed)
    opt = tds.SNOpt(node, lr=lr, backoff=beta)
    losses, factors = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        factors.append(float(opt.state[opt._owner].get("rate_factor", torch.tensor(1.0))))
    return losses, factors


@pytest.mark.parametrize("seed", [0, 1])
def test_backoff_on_a_quadratic_in_a_linear_ode(seed):
    """Full-batch least squares through a linear ODE, a convex quadratic in the weights. For a
    convex loss a step that raised the loss has ``⟨g_new, Δ⟩ ≥ L_new − L_old > 0``, so the
    factor of the next step must be lower (or on its floor): checked on every such step of a
    run at a rate that overshoots (1.0, the loss rises on several steps). At a small rate
    (1e-3) the loss falls on every step, consecutive gradients agree and the factor stays
    exactly 1: the run is the run without back-off, bit for bit.

    Kills: the reverse sign, a factor that moves on a clean descent, a factor that ignores
    the overshoots."""
    slow_b, factors_b = _fit(0.2, 1e-3, 30, seed)
    slow_0, _ = _fit(0.0, 1e-3, 30, seed)
    assert all(b < a for a, b in zip(slow_b, slow_b[1:]))
    assert factors_b == [1.0] * 30 and slow_b == slow_0
    losses, factors = _fit(0.2, 1.0, 60, seed)
    # losses[k] is the loss before step k (0-based); factors[k] the factor step k used, which
    # moves from k = warmup (5) on
    rises = [k for k in range(5, 60) if losses[k] > losses[k - 1]]
    assert len(rises) >= 3, rises
    for k in rises:
        assert factors[k] < factors[k - 1] or factors[k] == FLOOR, (k, factors[k - 1 : k + 1])
    assert min(factors) < 0.5


def test_resume_with_backoff_is_exact():
    """state_dict carries the factor and the last steps: a resumed run takes bit-identical
    steps (past the warmup, with the factor below 1)."""
    saved = resume_is_exact(4, 160, before=8, cut=128, after=3, update_freq=3, backoff=5.0, lr=0.2)
    entries = saved["state"].values()
    assert sum("rate_factor" in e for e in entries) == 1
    assert sum("last_step" in e for e in entries) == len(list(_net(4).parameters()))
    factor = next(e["rate_factor"] for e in entries if "rate_factor" in e)
    assert float(factor) < 1.0


@pytest.mark.parametrize(
    ("value", "match"),
    [(-0.1, r"backoff=-0\.1"), (float("nan"), r"backoff=nan"), (True, r"backoff=True")],
)
def test_bad_backoff_raises_and_changes_nothing(value, match):
    refused_untouched(match + r".*finite float >= 0 \(0 = off\)", backoff=value)


def refused_untouched(match: str, **kw) -> None:
    """``tds.SNOpt(model, **kw)`` raises a ValueError matching ``match`` and leaves the
    model's weights as they were."""
    model = _net(5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        tds.SNOpt(model, **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def load_refused_untouched(opt, state, match: str) -> None:
    """``opt.load_state_dict(state)`` raises a ValueError matching ``match`` and every
    tensor of the optimizer's state is as it was."""
    kept = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    now = opt.state_dict()
    for index, entry in kept["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(now["state"][index][key], value)


def test_backoff_state_of_the_wrong_shape_is_refused_and_changes_nothing():
    x, y = _classes(64, 2)
    model = _net(2)
    opt = tds.SNOpt(model, backoff=0.2, warmup=0)
    _train(model, opt, x, y, F.cross_entropy, 2, batch=16)
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["last_step"] = torch.zeros(3)
    load_refused_untouched(opt, state, r"last_step of parameter 0 has shape \(3,\)")
    _ce_step(model, x[:16], y[:16])
    opt.step()
