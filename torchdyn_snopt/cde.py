"""SNOpt curvature for users who keep calling ``torchcde.cdeint(X, func, z0, t, adjoint=True)``.

torchcde hands torchdiffeq its own wrapper of ``func``, which hides ``func``'s attributes (the
adjoint callbacks ``callback_*_adjoint`` included) from torchdiffeq, so nothing can be attached
to the solver from outside. What does reach ``func`` is every evaluation of torchdiffeq's
adjoint backward solve: ``func(t, z)`` with ``z`` a fresh leaf requiring grad, followed by
torchdiffeq's own vector-Jacobian product with the adjoint ``-a(t)``. :class:`CurvatureTap`
wraps ``func`` and, while SNOpt has armed it, records at each such evaluation every adapted
layer's input ``z̃`` (for ``A``) and, from a tensor hook on the layer's output, the gradient
``g = (∂F/∂h)ᵀ a`` of that VJP (for ``B``; the sign of ``a`` cancels in ``g gᵀ``). No extra
evaluation of ``func`` is made and the gradients stay torchdiffeq's.

Which evaluations count (eq. 13 needs states on the accepted trajectory): the backward solve
moves from ``t_N`` down to ``t_0``; a retried step after a rejection restarts from a later time,
so an evaluation at time ``t`` discards the recorded evaluations at times ``< t`` (they belong
to the rejected step, the initial-step probe, or a step past an output time that torchdiffeq
interpolates back from). Of the accepted steps' evaluations, the ones at step ends are kept
(:func:`_step_ends`), with equal consecutive times (an output time where ``a`` jumps) starting
a new segment. ``A_n(t)``, ``B_n(t)`` are then read off the uniform grid on ``[t_0, t_N]``
(``t_0`` = the forward solve's first time) by linear interpolation between these nodes exactly
as in :mod:`torchdyn_snopt.curvature.sampler` (``q = a / sqrt(t_N - t_0)``, per-sample scale).
An evaluation at a time at or after the start of the solve being recorded begins a new solve.

The moments ``Σ z̃z̃ᵀ``, ``Σ ggᵀ`` are computed only for the evaluations kept as nodes: each
evaluation holds its detached rows until the next ones classify it (as :func:`_step_ends`
will), so a solve holds the raw rows of a few evaluations at a time (at most
:data:`PENDING_LONE` + 3), however many steps it takes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from torchdyn_snopt.curvature.base import LayerAdapter
from torchdyn_snopt.curvature.capture import Record, Recorder
from torchdyn_snopt.curvature.sampler import NFE, subsample
from torchdyn_snopt.curvature.source import (
    CurvatureRequest,
    Factors,
    IntegralSource,
    NodeChain,
    RowMoments,
)

#: Lone evaluations (no run of equal times before them) whose raw rows are held before the
#: solve is taken to be run-free (euler, midpoint: every evaluation a node) and their moments
#: are computed at once.
PENDING_LONE = 5


@dataclass
class _Eval:
    """One backward evaluation: its time and, per layer, ``Σ z̃z̃ᵀ`` (``zz``), ``Σ ggᵀ``
    (``gg``, filled in by the VJP's tensor hooks) and the spatial locations seen.

    Until it is classified (``state`` ``"raw"``), the evaluation holds its detached rows
    instead: ``raw_z`` per record, ``raw_g`` per hook call, in arrival order. :meth:`keep`
    turns them into the moments (the same ``RowMoments.add`` calls in the same order as when
    computed at once), :meth:`drop` discards them. ``vjp``: a hook has run (its VJP reached
    the layers).
    """

    t: float
    zz: dict[LayerAdapter, RowMoments] = field(default_factory=dict)
    gg: dict[LayerAdapter, RowMoments] = field(default_factory=dict)
    locations: dict[LayerAdapter, int] = field(default_factory=dict)
    raw_z: list[tuple[LayerAdapter, Tensor]] = field(default_factory=list)
    raw_g: list[tuple[LayerAdapter, Tensor]] = field(default_factory=list)
    state: str = "raw"  # "raw", "kept" (moments computed) or "dropped" (no node)
    vjp: bool = False
    #: Set once settled (see :meth:`TapSampler._settle`): whether a pair of adjacent equal
    #: times lies at or before this evaluation, its position in its run of equal times (1 for
    #: the first), and whether its run has been classified.
    settled: bool = False
    after_pair: bool = False
    run_len: int = 1
    decided: bool = False

    def keep(self) -> None:
        """Compute the moments from the held rows (no-op unless raw)."""
        if self.state != "raw":
            return
        for adapter, z in self.raw_z:
            self.zz.setdefault(adapter, RowMoments()).add(z)
        for adapter, g in self.raw_g:
            self.gg.setdefault(adapter, RowMoments()).add(g)
        self.raw_z, self.raw_g, self.state = [], [], "kept"

    def drop(self) -> None:
        """Discard the held rows: this evaluation is no node (no-op unless raw)."""
        if self.state == "raw":
            self.raw_z, self.raw_g, self.state = [], [], "dropped"

    def add_g(self, adapter: LayerAdapter, g: Tensor) -> None:
        """A hook's gradient rows: summed if kept, held if raw."""
        if self.state == "kept":
            self.gg.setdefault(adapter, RowMoments()).add(g)
        else:
            self.raw_g.append((adapter, g))


class TapSampler(IntegralSource):
    """The curvature source of one :class:`CurvatureTap`: records the adjoint evaluations of
    the solve in progress and integrates them into :attr:`request` ``.factors``.

    Owned by its tap; an optimizer gives it a request with :meth:`bind` (before that, a
    request without layers: nothing is recorded). ``nfe.curvature`` counts recorded
    evaluations; ``horizon`` is the Gauss-Newton ``T`` (None: each solve's own span).
    """

    def __init__(self) -> None:
        self.request = CurvatureRequest([], Recorder([]))
        self.nfe = NFE()
        self.horizon: float | None = None
        self._stack: list[_Eval] = []  # the solve's evaluations, decreasing time
        self._settled: list[_Eval] = []  # those of _stack before its top whose VJP ran
        self._pending: list[_Eval] = []  # lone settled ones with no pair before them, raw
        self._run_free = False  # too many pending: moments of lone ones computed at once
        self._t_start = math.inf

    def bind(self, request: CurvatureRequest) -> None:
        """Record from now on as ``request`` says (replaces an earlier request)."""
        self.request = request

    @property
    def active(self) -> bool:
        return self.request.active

    def arm(self, armed: bool) -> None:
        self.request.armed = armed
        if not armed:
            self._reset()
            self._t_start = math.inf
            self.request.factors.clear()

    def _reset(self) -> None:
        self._stack, self._settled, self._pending, self._run_free = [], [], [], False

    def integrals(self) -> dict[LayerAdapter, Factors]:
        self._close()  # the solve in progress, if any
        return super().integrals()

    @property
    def factors(self) -> dict[LayerAdapter, Factors]:
        """Factors of every solve recorded so far, without taking them (closes the solve in
        progress)."""
        self._close()
        return self.request.factors.view()

    def forward_time(self, t: float) -> None:
        """A forward-solve evaluation: the solve's first time is the lowest one seen."""
        self._t_start = min(self._t_start, t)

    def observe(self, t: float, batch: int, records: list[Record]) -> None:
        """Record one adjoint evaluation at time ``t`` (hooks fill in ``B`` during its VJP)."""
        ours = set(self.request.adapters)
        records = [r for r in records if r[0] in ours and r[2].requires_grad]
        if not records:
            return
        if self._stack and t >= self._stack[0].t:
            self._close()  # back at the start time: a new backward solve
        while self._stack and self._stack[-1].t < t:
            self._pop()  # a rejected step's (or the step probe's) evaluations
        if self._stack:
            self._settle(self._stack[-1])  # its VJP has run (or never will)
        ev = _Eval(t)
        self.request.batch_size = batch
        self.nfe.curvature += 1
        with torch.no_grad():
            for adapter, inputs, output in records:
                z = adapter.input_rows(subsample(inputs, adapter.locations(output))).detach()
                ev.raw_z.append((adapter, z))
                ev.locations[adapter] = ev.locations.get(adapter, 0) + adapter.locations(output)
                output.register_hook(self._grad_hook(ev, adapter))
        self._stack.append(ev)

    @staticmethod
    def _grad_hook(ev: _Eval, adapter: LayerAdapter) -> Any:
        def hook(g: Tensor) -> None:
            ev.vjp = True
            if ev.state != "dropped":
                with torch.no_grad():
                    ev.add_g(adapter, adapter.output_rows(g).detach())

        return hook

    def _pop(self) -> None:
        """Discard the top evaluation (with whatever it holds)."""
        ev = self._stack.pop()
        if self._settled and self._settled[-1] is ev:
            self._settled.pop()
        if self._pending and self._pending[-1] is ev:
            self._pending.pop()

    def _settle(self, ev: _Eval) -> None:
        """Classify the evaluation below a new top as :func:`_step_ends` will (once).

        Its VJP has run by now (torchdiffeq's adjoint runs it before the next evaluation):
        without one it is dropped. When a lower time follows a run of equal times, the run
        keeps its last two (three or more) or its last one and drops the others; a lone one is
        dropped if a pair of equal times lies before it (the solve has runs), else it stays raw
        in ``_pending`` until the solve ends, up to :data:`PENDING_LONE` of them (then the
        solve is taken as run-free and their moments are computed). A dropped one is never a
        node: what lies before it stays, and a run that resumes after a rejected step only
        adds later members. :meth:`_close` still applies :func:`_step_ends` to the whole
        solve, so an evaluation kept here that ends up no node only cost its moments.
        """
        if ev.settled:
            return  # the top's successors were popped: it was settled before
        ev.settled = True
        if not ev.vjp:
            ev.drop()
            return
        s = self._settled
        if not s:  # the solve's first node
            ev.keep()
            s.append(ev)
            return
        prev = s[-1]
        ev.after_pair = prev.after_pair or prev.t == ev.t
        if prev.t == ev.t and len(s) > 1:  # the run of prev (not the solve's first) goes on
            ev.run_len = prev.run_len + 1
            if ev.run_len >= 3:
                s[-2].drop()  # not among the run's last two
        elif len(s) > 1:  # prev's run ended
            self._run_ended(prev, s[-2])
        s.append(ev)

    def _run_ended(self, last: _Eval, before: _Eval) -> None:
        if last.decided:
            return  # its successors were popped, a new lower one settled
        last.decided = True
        if last.run_len >= 2:
            last.keep()
            if last.run_len >= 3:
                before.keep()
            else:
                before.drop()
        elif last.after_pair:
            last.drop()  # an inner stage of a solve with runs
        elif self._run_free:
            last.keep()
        else:
            self._pending.append(last)
            if len(self._pending) > PENDING_LONE:  # no runs so far: a fixed-step solver
                self._run_free = True
                for e in self._pending:
                    e.keep()
                self._pending = []

    def _close(self) -> None:
        """Integrate the recorded solve onto the uniform grid and add it to the factors."""
        nodes = _step_ends([e for e in self._stack if e.vjp])  # evaluations whose VJP ran
        self._reset()
        if len(nodes) < 2:
            return
        # torchdiffeq steps past t_0 and interpolates: the grid starts at the forward's t_0.
        t_lo, t_hi = max(min(e.t for e in nodes), self._t_start), max(e.t for e in nodes)
        self._t_start = math.inf
        if t_hi <= t_lo:
            return
        batch = self.request.batch_size
        scale2 = batch**2 / (self.horizon or (t_hi - t_lo))  # q = a / sqrt(T) (§3.2)
        chain: NodeChain[_Eval] = NodeChain(t_lo, t_hi, self.request.grid_size)
        closed = [chain.push(e.t, e) for e in nodes] + [chain.end()]  # decreasing time
        for node in closed:
            if node is None or node.weight <= 0.0:
                continue
            w, e = node.weight, node.payload
            if e.state == "dropped":  # its VJP ran only after a later evaluation
                warnings.warn(
                    f"CurvatureTap: the evaluation at t={e.t} had no VJP when the next one "
                    "came and was dropped; it is left out of the factors",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            e.keep()  # held rows of a node not classified yet (the solve's end)
            for adapter, zz in e.zz.items():
                gg = e.gg.get(adapter)
                if gg is None or not gg.rows:
                    continue
                A, B = w * zz.total() / zz.rows, w * scale2 * gg.total() / gg.rows
                self.request.factors.add(adapter, A, B, e.locations[adapter], batch)


def _step_ends(evals: list[_Eval]) -> list[_Eval]:
    """The evaluations at accepted step ends, from the stage evaluations in decreasing time.

    An FSAL Runge-Kutta step (dopri5, tsit5) evaluates twice at its end time ``t1``: a last
    stage, then ``(t1, y1)`` with the accepted state; a new ``t`` interval adds a third
    evaluation at the same time after the adjoint's jump. Runs of equal times therefore mark
    step ends: keep the last two evaluations of a run of three (before / after the jump), the
    last of a run of two, and the solve's first evaluation (``t_N``); inner stages are dropped.
    Without any run (fixed-step or non-FSAL solvers) every stage evaluation is a node.
    """
    if all(a.t != b.t for a, b in zip(evals, evals[1:])):
        return evals
    out: list[_Eval] = evals[:1]
    i = 1
    while i < len(evals):
        j = i
        while j + 1 < len(evals) and evals[j + 1].t == evals[i].t:
            j += 1
        run = evals[i : j + 1]
        if len(run) >= 3:
            out += run[-2:]
        elif len(run) == 2:
            out.append(run[-1])
        i = j + 1
    return out


class CurvatureTap(nn.Module):
    """Wrap the ``func`` passed to ``torchcde.cdeint(..., adjoint=True)`` so that SNOpt sees it.

    Usage::

        tap = tds.CurvatureTap(func)            # keep it inside the model being optimized
        z = torchcde.cdeint(X, tap, z0, t, adjoint=True)
        opt = tds.SNOpt(model, lr=...)          # finds the tap, preconditions func's layers

    The tap calls ``func`` unchanged (outputs, gradients and the solver's behaviour are
    torchcde's); it records only while an optimizer has armed it and only inside torchdiffeq's
    adjoint backward (the module docstring explains which evaluations count). Supports a
    tensor ``z0`` (batch dimensions first) and increasing ``t``.
    """

    def __init__(self, func: nn.Module) -> None:
        super().__init__()
        if not isinstance(func, nn.Module):
            raise TypeError(f"func={type(func).__name__} must be a torch.nn.Module")
        self.func = func
        #: this tap's curvature source (see :class:`TapSampler`).
        self.sampler = TapSampler()

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        s = self.sampler
        if not (s.active and torch.is_grad_enabled() and z.requires_grad and z.is_leaf):
            if s.active and not torch.is_grad_enabled():
                s.forward_time(float(t))
            return self.func(t, z)
        with s.request.recorder.recording() as records:
            out = self.func(t, z)
        batch = math.prod(z.shape[:-1]) if z.dim() > 1 else 1
        s.observe(float(t.detach()), batch, records)
        return out
