"""The core's contracts: keyword-only constructors, enums that accept strings, warnings that
point at the caller, one hook per layer, curvature sources behind one interface."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn as nn
from torchdyn.core import NeuralODE

import torchdyn_snopt as tds
from torchdyn_snopt.adjoint import existing_record
from torchdyn_snopt.curvature.source import CurvatureSource, NodeChain
from torchdyn_snopt.distributed import AUTO, Group
from torchdyn_snopt.horizon import Policy

DT = torch.float64


class _Field(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, t: torch.Tensor, x: torch.Tensor, args: dict | None = None) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def _model() -> nn.Module:
    torch.manual_seed(0)
    node = NeuralODE(_Field(), sensitivity="snopt", solver="rk4", return_t_eval=False)
    return nn.Sequential(node).to(DT)


def test_arguments_after_lr_are_keyword_only():
    model = _model()
    with pytest.raises(TypeError):
        tds.SNOpt(model, 0.1, 0.9)  # type: ignore[misc]
    with pytest.raises(TypeError):
        tds.SNOptPreconditioner(model, 0.05)  # type: ignore[misc]
    tds.SNOpt(model, 0.1, momentum=0.5)
    for cls in (tds.SNOpt, tds.SNOptPreconditioner):
        params = inspect.signature(cls).parameters
        assert not [n for n in params if n.startswith("_")]
        kinds = {n: p.kind for n, p in params.items()}
        first = {"model", "lr"} if cls is tds.SNOpt else {"model"}
        assert all(k == inspect.Parameter.KEYWORD_ONLY for n, k in kinds.items() if n not in first)


@pytest.mark.parametrize("cls", [tds.SNOpt, tds.SNOptPreconditioner])
def test_uncovered_parameter_warning_points_at_the_caller(cls):
    node = NeuralODE(_Field(), sensitivity="snopt", solver="rk4").to(DT)
    model = nn.Sequential(node, nn.Linear(3, 2).to(DT))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls(model, lr=0.1, full_precond=False)
    (w,) = [w for w in caught if "no Kronecker factors" in str(w.message)]
    assert w.filename == __file__


def test_choices_accept_strings_and_enums():
    model = _model()
    for group in ("auto", AUTO, Group.AUTO, None):
        tds.SNOptPreconditioner(model, process_group=group)
    assert tds.SNOpt(model, lr=0.1, refresh="power").preconditioner.refresh is tds.Refresh.POWER
    assert tds.FreeHorizon(policy="baseline").policy is Policy.BASELINE
    assert tds.FreeHorizon(policy=Policy.FEEDBACK).policy == "feedback"
    with pytest.raises(ValueError, match="policy='newton'"):
        tds.FreeHorizon(policy="newton")
    with pytest.raises(TypeError, match="process_group='default'"):
        tds.SNOpt(model, lr=0.1, process_group="default")


def test_sources_share_one_interface_and_nothing_is_stored_on_modules():
    model = _model()
    opt = tds.SNOpt(model, lr=0.1, update_freq=1, full_precond=True)
    opt2 = tds.SNOpt(model, lr=0.1, update_freq=1)  # a second optimizer replaces the hooks
    assert all(isinstance(s, CurvatureSource) for s in opt2.preconditioner._sources)
    x = torch.randn(4, 3, dtype=DT)
    model(x).pow(2).mean().backward()
    assert opt2.step() is None and opt2.preconditioner.last_factors
    lin = model[0].vf.vf.lin
    assert len(lin._forward_hooks) == 1
    for m in model.modules():
        assert not [k for k in vars(m) if "snopt" in k]
    record = existing_record(model[0])
    assert record is not None and record.request is not None
    assert record.request.adapters == opt2.preconditioner.adapters
    del opt


def test_node_chain_spreads_every_grid_point_once():
    """Nodes at uneven times, both directions: the weights sum to G·Δt (each grid point's
    Δt is split between the two nodes around it)."""
    times = [0.0, 0.13, 0.4, 0.4, 0.71, 1.0]
    for order in (times, times[::-1]):
        chain: NodeChain[int] = NodeChain(0.0, 1.0, 11)
        closed = [chain.push(t, i) for i, t in enumerate(order)] + [chain.end()]
        total = sum(n.weight for n in closed if n is not None)
        assert total == pytest.approx(11 * 0.1)


def test_skipped_step_warning_points_at_the_caller():
    model = _model()
    opt = tds.SNOpt(model, lr=0.1)
    model(torch.randn(4, 3, dtype=DT)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).grad.fill_(float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    (w,) = [w for w in caught if "skipped this step" in str(w.message)]
    assert w.filename == __file__
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
