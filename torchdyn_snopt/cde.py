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
"""

from __future__ import annotations

import math
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


@dataclass
class _Eval:
    """One backward evaluation: its time and, per layer, ``Σ z̃z̃ᵀ`` (``zz``), ``Σ ggᵀ``
    (``gg``, filled in by the VJP's tensor hooks) and the spatial locations seen."""

    t: float
    zz: dict[LayerAdapter, RowMoments] = field(default_factory=dict)
    gg: dict[LayerAdapter, RowMoments] = field(default_factory=dict)
    locations: dict[LayerAdapter, int] = field(default_factory=dict)


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
        self._stack: list[_Eval] = []
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
            self._stack.clear()
            self._t_start = math.inf
            self.request.factors.clear()

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
            self._stack.pop()  # a rejected step's (or the step probe's) evaluations
        ev = _Eval(t)
        self.request.batch_size = batch
        self.nfe.curvature += 1
        with torch.no_grad():
            for adapter, inputs, output in records:
                z = adapter.input_rows(subsample(inputs, adapter.locations(output))).detach()
                ev.zz.setdefault(adapter, RowMoments()).add(z)
                ev.locations[adapter] = ev.locations.get(adapter, 0) + adapter.locations(output)
                output.register_hook(self._grad_hook(ev, adapter))
        self._stack.append(ev)

    @staticmethod
    def _grad_hook(ev: _Eval, adapter: LayerAdapter) -> Any:
        def hook(g: Tensor) -> None:
            with torch.no_grad():
                ev.gg.setdefault(adapter, RowMoments()).add(adapter.output_rows(g).detach())

        return hook

    def _close(self) -> None:
        """Integrate the recorded solve onto the uniform grid and add it to the factors."""
        nodes = _step_ends([e for e in self._stack if e.gg])  # evaluations whose VJP ran
        self._stack = []
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
