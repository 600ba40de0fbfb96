"""SNOpt's ``spike_ratio``: the spike test at its threshold by hand, the undone step, the
cut and recovery of the rate, a second spike with nothing to undo, an overshooting rate on a
least-squares problem inside a linear ODE, resume and bad values."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import torchdyn_snopt as tds
from tests.test_backoff import _quadratic, load_refused_untouched, refused_untouched
from tests.test_defaults import _classes, _net, resume_is_exact

RATIO = 8.0
#: the step settings of the by-hand runs: no warmup (rate lr from the first step), no
#: back-off (the spike factor alone scales the rate), the default graft
KW = dict(lr=0.03, warmup=0, backoff=0.0, update_freq=3)


def _scaled_step(model, x, y, scale):
    model.zero_grad()
    (scale * F.cross_entropy(model(x), y)).backward()


def _grad_norm(model, x, y) -> float:
    """‖∇L‖ at ``model``'s weights, on a copy (no backward pass on the optimizer's model)."""
    twin = _net(77)
    twin.load_state_dict(model.state_dict())
    F.cross_entropy(twin(x), y).backward()
    return math.sqrt(sum(float(p.grad.square().sum()) for p in twin.parameters()))


def _spike_factor(opt) -> float:
    return float(opt.state[opt._owner].get("spike_factor", torch.tensor(float("nan"))))


def _first_step(seed: int = 0, spike_ratio: float | None = RATIO):
    """One step at loss scale 1. Adam's bias-corrected ``v̂`` is then ``g₀²`` exactly, so the
    second step's ratio ``‖g‖/√Σv̂`` is ``scale·‖∇L(θ₁)‖/‖g₀‖``."""
    x, y = _classes(32, seed)
    model = _net(seed)
    opt = tds.SNOpt(model, spike_ratio=spike_ratio, **KW)
    g0 = _grad_norm(model, x, y)
    theta0 = [p.detach().clone() for p in model.parameters()]
    _scaled_step(model, x, y, 1.0)
    opt.step()
    return model, opt, x, y, g0, theta0


@pytest.mark.parametrize("side", [0.98, 1.02])
def test_spike_threshold_and_undo_by_hand(side):
    """The second step's loss is scaled so that ``‖g‖/√Σv̂`` is 0.98 or 1.02 times
    ``spike_ratio`` (8). Below: the step is the step of ``spike_ratio=None``, bit for bit,
    and the factor stays 1. Above: the first step is undone (the weights are back at θ₀ to
    rounding: measured 5.6e-17, bound 1e-15), Adam's moments and step count are those after
    the first step, no last step is kept, and the factor is 0.5.

    Kills: the threshold on ‖g‖² against the ratio (not its square), v̂ without its bias
    correction, a spike that only cuts the rate (no undo), Adam's moments fed the spike."""
    model, opt, x, y, g0, theta0 = _first_step()
    twin, opt_t, *_ = _first_step(spike_ratio=None)
    moments = copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(model.parameters())})
    scale = side * RATIO * g0 / _grad_norm(model, x, y)
    _scaled_step(model, x, y, scale)
    _scaled_step(twin, x, y, scale)
    opt.step()
    opt_t.step()
    if side < 1:
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
        assert _spike_factor(opt) == 1.0
        return
    for p, p0 in zip(model.parameters(), theta0):
        torch.testing.assert_close(p.detach(), p0, rtol=0, atol=1e-15)
    for i, p in enumerate(model.parameters()):
        state = opt.state[p]
        assert "last_step" not in state
        assert state["step"] == moments[i]["step"] == 1
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], moments[i][key])
    assert _spike_factor(opt) == 0.5


def test_second_spike_cuts_again_and_steps():
    """Right after an undo there is no step to take back: a second spike cuts the factor to
    0.25 and steps with it. That step equals the step of an optimizer without the rule loaded
    from the same state with ``lr·0.25``, bit for bit (a power of two scales exactly). Then
    accepted steps raise the factor by 5% each: ``min(1, 0.25·1.05^k)``.

    Kills: a second undo (the weights going back further), no step after the cut, a cut that
    resets instead of compounding, recovery that jumps to 1 or never starts."""
    model, opt, x, y, g0, _ = _first_step()
    _scaled_step(model, x, y, 100.0)  # a spike: undone
    opt.step()
    assert _spike_factor(opt) == 0.5
    twin = _net(50)
    twin.load_state_dict(model.state_dict())
    plain = tds.SNOpt(twin, spike_ratio=None, **KW)
    plain.load_state_dict(copy.deepcopy(opt.state_dict()))
    plain.param_groups[0]["lr"] = KW["lr"] * 0.25  # after loading: the state carries lr
    before = [p.detach().clone() for p in model.parameters()]
    _scaled_step(model, x, y, 100.0)
    _scaled_step(twin, x, y, 100.0)
    opt.step()
    plain.step()
    assert _spike_factor(opt) == 0.25
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    factors = []
    for k in range(30):
        rows = torch.arange(k * 8, k * 8 + 32) % len(x)
        _scaled_step(model, x[rows], y[rows], 1.0)
        opt.step()
        factors.append(_spike_factor(opt))
    want = [min(1.0, 0.25 * 1.05 ** (k + 1)) for k in range(30)]
    assert factors == pytest.approx(want, rel=1e-12, abs=0)


def _fit(spike_ratio: float | None, lr: float, steps: int, seed: int):
    """``steps`` full-batch steps on the least-squares problem (no warmup or back-off): the
    loss before each step, the weights before each step and after the last, the factor."""
    node, loss_fn = _quadratic(seed)
    opt = tds.SNOpt(node, lr=lr, warmup=0, backoff=0.0, spike_ratio=spike_ratio)
    losses, weights = [], []
    for _ in range(steps):
        weights.append([p.detach().clone() for p in node.parameters()])
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    weights.append([p.detach().clone() for p in node.parameters()])
    return losses, weights, _spike_factor(opt)


@pytest.mark.parametrize("seed", [0, 1])
def test_overshoot_on_a_quadratic_in_a_linear_ode_is_undone(seed):
    """Full-batch least squares through a linear ODE (a convex quadratic in the weights). At
    a rate far too high (30, no warmup) the first step raises the loss more than 100-fold; the
    gradient there is a spike, so the second step undoes the first: the weights are back
    where they started (measured: exactly; bound 1e-13) and the factor is 0.5;
    the third step starts again from there at half the rate. At a small rate (1e-3) no spike
    is seen: the run is the run without the rule, bit for bit, and the factor stays 1.

    Kills: a rule that never fires, one that fires on a clean descent, an undo that
    subtracts the step twice or not at all."""
    slow, slow_w, slow_factor = _fit(RATIO, 1e-3, 30, seed)
    slow_off, slow_off_w, _ = _fit(None, 1e-3, 30, seed)
    assert slow == slow_off and slow_factor == 1.0
    for a, b in zip(slow_w[-1], slow_off_w[-1]):
        assert torch.equal(a, b)
    losses, weights, _ = _fit(RATIO, 30.0, 2, seed)
    assert losses[1] > 100 * losses[0], losses
    for p, p0 in zip(weights[2], weights[0]):
        torch.testing.assert_close(p, p0, rtol=0, atol=1e-13)
    _, weights3, factor = _fit(RATIO, 30.0, 3, seed)
    assert factor == 0.5 * 1.05
    assert any(not torch.equal(p, p0) for p, p0 in zip(weights3[3], weights3[0]))


def test_resume_with_spike_state_is_exact():
    """state_dict carries the spike factor (below 1 at the save) and the last steps: a
    resumed run takes bit-identical steps."""
    saved = resume_is_exact(4, 160, before=8, cut=128, after=4, update_freq=3, lr=3.0,
                            spike_ratio=2.0)  # fmt: skip
    entries = list(saved["state"].values())
    assert sum("spike_factor" in e for e in entries) == 1
    factor = next(e["spike_factor"] for e in entries if "spike_factor" in e)
    assert float(factor) < 1.0


def test_no_spike_rule_without_the_graft():
    """With ``graft="none"`` there is no Adam second moment to compare with: no factor is
    kept and a large gradient is stepped on (the paper's rule is unchanged)."""
    x, y = _classes(32, 0)
    model = _net(0)
    opt = tds.SNOpt(model, graft="none", lr=1e-3, warmup=0, backoff=0.0)
    for scale in (1.0, 1e3):
        before = [p.detach().clone() for p in model.parameters()]
        _scaled_step(model, x, y, scale)
        opt.step()
        assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all("spike_factor" not in s for s in opt.state.values())


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (1.0, r"spike_ratio=1\.0"),
        (0.5, r"spike_ratio=0\.5"),
        (float("nan"), r"spike_ratio=nan"),
        (float("inf"), r"spike_ratio=inf"),
        (True, r"spike_ratio=True"),
    ],
)
def test_bad_spike_ratio_raises_and_changes_nothing(value, match):
    refused_untouched(match + r".*None \(off\) or a finite float > 1", spike_ratio=value)


def test_spike_state_of_the_wrong_shape_is_refused():
    model, opt, x, y, *_ = _first_step()
    state = copy.deepcopy(opt.state_dict())
    owner = next(i for i, e in state["state"].items() if "spike_factor" in e)
    state["state"][owner]["spike_factor"] = torch.ones(2)
    load_refused_untouched(opt, state, r"spike_factor of parameter \d+ has shape \(2,\)")
