"""CurvatureTap computes moments only for the evaluations kept as nodes, with a bounded window
of raw rows, and gets bit for bit the factors of computing every evaluation's moments."""

import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torchcde

import torchdyn_snopt as tds
import torchdyn_snopt.cde as cde
from tests.helpers.data import cde_path_series
from tests.helpers.numerics import DTYPE
from torchdyn_snopt.curvature.capture import Recorder
from torchdyn_snopt.curvature.registry import adapter_for
from torchdyn_snopt.curvature.sampler import subsample
from torchdyn_snopt.curvature.source import CurvatureRequest, NodeChain, RowMoments
from torchdyn_snopt.models.ncde import CDEFunc

#: Raw-row evaluations at once: PENDING_LONE lone ones, an open run's two, the new top.
MAX_RAW = cde.PENDING_LONE + 3


@dataclass
class _EagerEval:
    t: float
    zz: dict = field(default_factory=dict)
    gg: dict = field(default_factory=dict)
    locations: dict = field(default_factory=dict)


class _EagerTapSampler(cde.TapSampler):
    """The reference: every evaluation's moments computed at once (the tap before laziness)."""

    def observe(self, t, batch, records):
        ours = set(self.request.adapters)
        records = [r for r in records if r[0] in ours and r[2].requires_grad]
        if not records:
            return
        if self._stack and t >= self._stack[0].t:
            self._close()
        while self._stack and self._stack[-1].t < t:
            self._stack.pop()
        ev = _EagerEval(t)
        self.request.batch_size = batch
        self.nfe.curvature += 1
        with torch.no_grad():
            for adapter, inputs, output in records:
                z = adapter.input_rows(subsample(inputs, adapter.locations(output))).detach()
                ev.zz.setdefault(adapter, RowMoments()).add(z)
                ev.locations[adapter] = ev.locations.get(adapter, 0) + adapter.locations(output)
                output.register_hook(self._eager_hook(ev, adapter))
        self._stack.append(ev)

    @staticmethod
    def _eager_hook(ev: Any, adapter: Any) -> Any:
        def hook(g):
            with torch.no_grad():
                ev.gg.setdefault(adapter, RowMoments()).add(adapter.output_rows(g).detach())

        return hook

    def _close(self):
        nodes = cde._step_ends([e for e in self._stack if e.gg])
        self._stack = []
        if len(nodes) < 2:
            return
        t_lo, t_hi = max(min(e.t for e in nodes), self._t_start), max(e.t for e in nodes)
        self._t_start = math.inf
        if t_hi <= t_lo:
            return
        batch = self.request.batch_size
        scale2 = batch**2 / (self.horizon or (t_hi - t_lo))
        chain = NodeChain(t_lo, t_hi, self.request.grid_size)
        closed = [chain.push(e.t, e) for e in nodes] + [chain.end()]
        for node in closed:
            if node is None or node.weight <= 0.0:
                continue
            w, e = node.weight, node.payload
            for adapter, zz in e.zz.items():
                gg = e.gg.get(adapter)
                if gg is None or not gg.rows:
                    continue
                A, B = w * zz.total() / zz.rows, w * scale2 * gg.total() / gg.rows
                self.request.factors.add(adapter, A, B, e.locations[adapter], batch)


def _assert_equal_factors(lazy: dict, eager: dict) -> None:
    assert len(lazy) == len(eager) > 0
    for a, b in zip(lazy.values(), eager.values()):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        assert (a.locations, a.batch_size) == (b.locations, b.batch_size)


# --- synthetic evaluation sequences, fed to observe() by hand --------------------------------


def _drive(sampler: cde.TapSampler, seq: list, seed: int = 0, grid: int = 9) -> dict:
    """Feed ``seq`` (times, or ``(t, False)`` for an evaluation whose VJP never runs, or
    ``(t, "late")`` for one whose VJP runs after the next evaluation; ``None`` closes the
    solve) through two linear layers, as torchdiffeq's adjoint would."""
    torch.manual_seed(seed)
    lin1, lin2 = torch.nn.Linear(3, 4).to(DTYPE), torch.nn.Linear(4, 2).to(DTYPE)
    adapters = [adapter_for(lin1, "l1"), adapter_for(lin2, "l2")]
    sampler.bind(CurvatureRequest(adapters, Recorder([]), grid_size=grid, armed=True))
    g = torch.Generator().manual_seed(seed)
    sampler.forward_time(0.0)  # the forward solve's first time
    late: list = []
    for item in seq:
        if item is None:
            sampler.factors  # noqa: B018 (closes the solve)
            sampler.forward_time(0.0)
            continue
        t, vjp = item if isinstance(item, tuple) else (item, True)
        x = torch.randn(5, 3, dtype=DTYPE, generator=g).requires_grad_()
        h = lin1(x)
        u = torch.tanh(h)
        out = lin2(u)
        records = [(adapters[0], (x,), h), (adapters[1], (u,), out)]
        sampler.observe(float(t), 5, records)
        for args in late:
            torch.autograd.grad(*args)
        late = []
        if vjp:
            a = torch.randn(out.shape, dtype=DTYPE, generator=g)
            (late if vjp == "late" else []).append((out, (x, lin1.weight), a))
            if vjp != "late":
                torch.autograd.grad(out, (x, lin1.weight), a)
    return {a: f for a, f in zip(range(2), sampler.factors.values())}


def _solver_like(seed: int, steps: int, stages: list[float], fsal_pair: bool) -> list:
    """Backward-solve-like times from 10 down: a probe, steps with the given stage fractions
    (1.0: the step end), rejected steps (their stages popped by the retry), output times
    (a third evaluation at the step end), the odd evaluation without VJP."""
    r = random.Random(seed)
    seq: list = [10.0, 10.0 - 0.05]  # f0 at t_N, the initial-step probe
    t0 = 10.0
    for _ in range(steps):
        dt = r.uniform(0.05, 0.2)
        if r.random() < 0.2:  # rejected: all its stages, then the retry's
            seq += [t0 - a * dt for a in stages]
            dt *= r.uniform(0.2, 0.9)
        for a in stages:
            t = t0 - a * dt
            seq.append((t, False) if r.random() < 0.03 else t)
        t0 -= dt
        if fsal_pair:
            seq.append(t0)  # the FSAL evaluation (or the next step's first stage)
        if r.random() < 0.25:  # an output time: the next interval starts with f0 at t0
            seq += [t0, t0 - 0.01]  # and its probe
    return seq


DOPRI5 = [0.2, 0.3, 0.8, 8 / 9, 1.0]
RK4 = [1 / 3, 2 / 3, 1.0]  # with the next step's first evaluation at the step end
EULER = [1.0]

SEQUENCES = {
    "dopri5": _solver_like(0, 40, DOPRI5, True) + [None] + _solver_like(1, 30, DOPRI5, True),
    "rk4": _solver_like(2, 50, RK4, True),
    "euler": _solver_like(3, 60, EULER, False) + [None] + _solver_like(4, 3, EULER, False),
    "bosh3": _solver_like(5, 40, [0.5, 0.75, 1.0], False),
    "few": [10.0, 9.0, 8.0],
    "short_run_free": [10.0, 9.9, 9.5, 9.5, 9.7, 9.3, 9.0],  # a popped run: run-free after all
    "first_pair": [10.0, 10.0, 9.9, 9.5, 9.5, 9.2, 9.0, 9.0, 9.0, 8.5],
    "long_run": [10.0, 9.0, 9.0, 9.0, 9.0, 9.0, 8.0, 7.0, 7.0, 6.5, 6.0],
    "resumed_runs": [10.0, 10.0, 9.0, 8.0, 7.5, 9.0, 8.5, 8.0, 8.0, 7.0, 6.0, 8.0, 8.0, 7.0],
    "no_vjp": [10.0, 9.8, 9.5, (9.5, False), 9.5, 9.2, (9.0, False), 9.0, 8.0, 8.0],
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_lazy_factors_equal_eager_on_synthetic_sequences(name):
    seq = SEQUENCES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lazy = _drive(cde.TapSampler(), seq)
    _assert_equal_factors(lazy, _drive(_EagerTapSampler(), seq))


def test_a_vjp_after_the_next_evaluation_is_reported():
    # torchdiffeq runs each VJP before the next evaluation; the tap relies on it
    seq = [10.0, 9.5, (9.0, "late"), 8.5, 8.0]
    with pytest.warns(RuntimeWarning, match="had no VJP when the next one came"):
        _drive(cde.TapSampler(), seq)


# --- real torchcde solves ---------------------------------------------------------------------


def _path(length: int = 8):
    x, t = cde_path_series(length=length)
    coeffs = torchcde.hermite_cubic_coefficients_with_backward_differences(x, t)
    return torchcde.CubicSpline(coeffs, t), t


def _solve(method: str, sampler: cde.TapSampler | None = None, **kw) -> tds.CurvatureTap:
    X, t = _path()
    torch.manual_seed(0)
    func = CDEFunc(3, 5, 7).to(DTYPE)
    init = torch.nn.Linear(3, 5).to(DTYPE)
    tap = tds.CurvatureTap(func)
    if sampler is not None:
        tap.sampler = sampler
    model = torch.nn.ModuleDict({"f": tap, "init": init})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init is outside (full_precond=False)
        tds.SNOptPreconditioner(model, update_freq=1, full_precond=False, grid_size=50)
    tap.sampler.arm(True)
    z = torchcde.cdeint(X, tap, init(X.evaluate(t[0])), t, adjoint=True, method=method, **kw)
    (z**2).mean().backward()
    return tap


METHODS = {
    "dopri5": {"atol": 1e-7, "rtol": 1e-7},
    "dopri5_loose": {"atol": 1e-3, "rtol": 1e-3},
    "rk4": {"options": {"step_size": 0.05}},
    "euler": {"options": {"step_size": 0.05}},
    "midpoint": {"options": {"step_size": 0.1}},
    "bosh3": {"atol": 1e-6, "rtol": 1e-6},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_lazy_factors_equal_eager_on_torchcde_solves(name):
    method = name.split("_")[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        lazy = _solve(method, **METHODS[name]).sampler.factors
    _assert_equal_factors(lazy, _solve(method, _EagerTapSampler(), **METHODS[name]).sampler.factors)


@pytest.mark.parametrize("name", ["dopri5", "rk4", "euler"])
def test_raw_rows_stay_bounded_in_a_long_solve(name, monkeypatch):
    most, evals = [0], [0]
    observe = cde.TapSampler.observe

    def watched(self, *args):
        observe(self, *args)
        evals[0] += 1
        most[0] = max(most[0], sum(e.state == "raw" for e in self._stack))

    monkeypatch.setattr(cde.TapSampler, "observe", watched)
    kw = {"atol": 1e-9, "rtol": 1e-9} if name == "dopri5" else {"options": {"step_size": 0.005}}
    tap = _solve(name, **kw)
    assert evals[0] > 200  # a long solve
    assert 0 < most[0] <= MAX_RAW
    assert tap.sampler.factors


@pytest.mark.parametrize("name", ["dopri5", "rk4", "euler"])
def test_moments_only_for_kept_evaluations(name, monkeypatch):
    adds, nodes, evals = [0], [0], [0]
    add, step_ends, observe = RowMoments.add, cde._step_ends, cde.TapSampler.observe

    def counted_add(self, rows):
        adds[0] += 1
        add(self, rows)

    def counted_step_ends(ev):
        out = step_ends(ev)
        nodes[0] += len(out)
        return out

    def counted_observe(self, *args):
        evals[0] += 1
        observe(self, *args)

    monkeypatch.setattr(RowMoments, "add", counted_add)
    monkeypatch.setattr(cde, "_step_ends", counted_step_ends)
    monkeypatch.setattr(cde.TapSampler, "observe", counted_observe)
    kw = {"atol": 1e-7, "rtol": 1e-7} if name == "dopri5" else {"options": {"step_size": 0.02}}
    tap = _solve(name, **kw)
    assert tap.sampler.factors
    per_eval = 2 * 2  # two layers, z and g
    assert nodes[0] > 20
    assert adds[0] <= per_eval * (nodes[0] + 2)  # the kept nodes (and the odd lone one)
    if name != "euler":  # inner stages dropped: far fewer moments than evaluations
        assert adds[0] <= 0.6 * per_eval * evals[0]
