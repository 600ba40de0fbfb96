"""Bad input gets a clear, early error and changes nothing; gradient accumulation; registration.

Every case runs under a timeout: before these checks a NaN state or an integer ``t_span`` made
torchdyn's adaptive loop spin forever, and such a regression must fail, not stall CI.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torchdyn.core import MultipleShootingLayer, NeuralODE
from torchdyn.core.problems import ODEProblem

import torchdyn_snopt as tds
import torchdyn_snopt.registration as registration
from tests.helpers.data import classification_data
from tests.helpers.models import OdeClassifier, TwoLayerField
from tests.helpers.numerics import DTYPE

pytestmark = pytest.mark.timeout(60)


def _node(**kw) -> NeuralODE:
    torch.manual_seed(0)
    field = TwoLayerField(3, 6).to(DTYPE)
    return NeuralODE(field, sensitivity="snopt", solver="dopri5", atol=1e-6, rtol=1e-6, **kw)


def _x() -> torch.Tensor:
    return torch.randn(4, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))


T01 = torch.tensor([0.0, 1.0], dtype=DTYPE)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_initial_state_is_refused(bad):
    """Kills: dropping the finiteness check (the adaptive loop never accepts a step)."""
    x = _x()
    x[1, 2] = bad
    with pytest.raises(ValueError, match="initial state x holds non-finite"):
        _node()(x, T01)


def test_non_finite_parameter_is_refused_and_unchanged():
    node = _node()
    with torch.no_grad():
        node.vf.vf.l1.weight[0, 0] = float("nan")
    before = copy.deepcopy(node.state_dict())
    with pytest.raises(ValueError, match="non-finite parameters"):
        node(_x(), T01)
    after = node.state_dict()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)


def test_integer_t_span_is_converted_like_torch_would():
    """``torch.tensor([0, 1])`` (int64) used to hang the solve; now it is the float span."""
    node = _node()
    x = _x()
    _, ints = node(x, torch.tensor([0, 1]))
    _, floats = node(x, T01)
    assert ints.dtype == DTYPE
    torch.testing.assert_close(ints, floats, rtol=0, atol=0)


def test_float32_t_span_with_float64_state_runs_in_float64():
    node = _node()
    x = _x()
    t, sol = node(x, T01.float())
    assert t.dtype == DTYPE and sol.dtype == DTYPE
    torch.testing.assert_close(sol, node(x, T01)[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "t_span, match",
    [
        ([0.0, 1.0, 0.5], "not strictly monotonic"),
        ([0.0, 1.0, 1.0], "not strictly monotonic"),
        ([0.5, 0.5], "not strictly monotonic"),
        ([0.0], "1-D tensor of >= 2 times"),
        ([[0.0, 1.0]], "1-D tensor of >= 2 times"),
        ([0.0, float("nan")], "non-finite times"),
    ],
)
def test_bad_t_span_is_refused_with_what_is_accepted(t_span, match):
    with pytest.raises(ValueError, match=match):
        _node()(_x(), torch.tensor(t_span, dtype=DTYPE))


def test_state_dtype_other_than_field_is_refused():
    with pytest.raises(TypeError, match="parameters are torch.float64 .* state x is torch.float32"):
        _node()(_x().float(), T01)


def test_integer_state_is_refused():
    with pytest.raises(TypeError, match="accepted: a floating tensor"):
        _node()(torch.ones(4, 3, dtype=torch.long), T01)


def test_multiple_shooting_with_snopt_is_refused_at_construction():
    """torchdyn's MultipleShootingProblem has its own backward dispatch: it used to accept
    ``sensitivity="snopt"`` and fail later with a ``None`` autograd function."""
    with pytest.raises(ValueError, match="not supported by MultipleShootingLayer"):
        MultipleShootingLayer(nn.Linear(2, 2), solver="zero", sensitivity="snopt")


def test_registration_check_names_the_supported_torchdyn(monkeypatch):
    """A torchdyn whose ODEProblem lacks the patched method fails with one clear error."""
    monkeypatch.delattr(ODEProblem, "_autograd_func")
    with pytest.raises(ImportError, match=r"torchdyn==1\.0\.6.*_autograd_func"):
        registration.check_torchdyn()


def test_registration_check_passes_on_the_installed_torchdyn():
    registration.check_torchdyn()


# --------------------------------------------------------------------------- state_dict


def _trained_opt(hidden: int = 8) -> tuple[nn.Module, tds.SNOpt]:
    torch.manual_seed(0)
    model = OdeClassifier(hidden=hidden).to(DTYPE)
    opt = tds.SNOpt(model, lr=0.05, update_freq=2, full_precond=True)
    x, y = classification_data(32)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def _snapshot(opt: tds.SNOpt) -> dict:
    return copy.deepcopy(opt.state_dict())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_load_state_dict_without_preconditioner_entry_is_refused():
    _, opt = _trained_opt()
    before = _snapshot(opt)
    state = opt.state_dict()
    del state["preconditioner"]
    with pytest.raises(ValueError, match="no 'preconditioner' entry"):
        opt.load_state_dict(state)
    assert _same(before, _snapshot(opt))


def test_load_state_dict_of_other_widths_is_refused_before_changing_anything():
    """Kills: a shape check after the momentum buffers were loaded (half-changed state)."""
    _, other = _trained_opt(hidden=5)
    _, opt = _trained_opt(hidden=8)
    before = _snapshot(opt)
    match = r"'ode.vf.vf.l1': UB has shape \(5, 5\), this model's layer needs \(8, 8\)"
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(other.state_dict())
    assert _same(before, _snapshot(opt))


def test_load_state_dict_with_a_bad_graft_state_is_refused_before_changing_anything():
    """The graft's per-layer shortest length (``length_cap``) is a 0-d tensor; one of another
    shape (a hand-edited or foreign checkpoint) is named and refused before anything changes.
    """
    torch.manual_seed(0)
    model = OdeClassifier().to(DTYPE)
    opt = tds.SNOpt(model, lr=0.05, update_freq=2, warmup=1)  # steps 2, 3 record a shortest
    x, y = classification_data(32)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    before = _snapshot(opt)
    state = _snapshot(opt)  # a copy: state_dict() shares the live per-parameter dicts
    index = next(i for i, e in state["state"].items() if "shortest" in e)
    state["state"][index]["shortest"] = torch.ones(2, dtype=DTYPE)
    with pytest.raises(ValueError, match=rf"shortest of parameter {index} has shape \(2,\)"):
        opt.load_state_dict(state)
    assert _same(before, _snapshot(opt))


def test_preconditioner_state_dict_missing_keys_is_refused():
    _, opt = _trained_opt()
    with pytest.raises(ValueError, match=r"lacks \['steps'\]"):
        opt.preconditioner.load_state_dict({"armed": True, "layers": {}})


# --------------------------------------------------------------------------- accumulation


def _factors_after(passes: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    torch.manual_seed(0)
    model = OdeClassifier(solver="rk4").to(DTYPE)  # fixed steps: the same nodes in every pass
    opt = tds.SNOpt(model, lr=0.1, full_precond=True)
    opt.zero_grad()
    for x, y in passes:
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return opt.preconditioner.last_factors


def test_gradient_accumulation_averages_factors_like_one_concatenated_pass():
    """k backward passes (each loss a mean over its own samples) before one step: the factors
    equal those of one pass over the concatenated batch. Kills: summing the passes' factors
    (2x too large), or counting the ODE's many solves instead of the passes."""
    x, y = classification_data(32)
    one = _factors_after([(x, y)])
    two = _factors_after([(x[:16], y[:16]), (x[16:], y[16:])])
    assert one.keys() == two.keys() and len(one) == 4
    for name in one:
        for key in ("A", "B"):
            a, b = getattr(two[name], key), getattr(one[name], key)
            err = float((a - b).norm() / b.norm())
            assert err < 1e-12, (name, key, err)  # measured: <= 4e-16
        assert two[name].locations == one[name].locations
