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
from torchdyn_snopt.curvature.capture import recording
from torchdyn_snopt.curvature.sampler import (
    NFE,
    Factors,
    segment_weights,
    subsample,
    uniform_grid,
)


@dataclass
class _Eval:
    """One backward evaluation: its time and per-layer sums ``Σ z̃z̃ᵀ``, ``Σ ggᵀ`` and counts."""

    t: float
    zz: dict[LayerAdapter, list[Any]] = field(default_factory=dict)
    gg: dict[LayerAdapter, list[Any]] = field(default_factory=dict)
    locations: dict[LayerAdapter, int] = field(default_factory=dict)


@dataclass
class TapSampler:
    """The tap's counterpart of :class:`~torchdyn_snopt.curvature.sampler.CurvatureSampler`:
    same attributes for the optimizer (``adapters``, ``armed``, ``grid_size``, ``batch_size``,
    ``factors``, ``nfe``)."""

    adapters: list[LayerAdapter] = field(default_factory=list)
    grid_size: int = 100
    batch_size: int = 1
    horizon: float | None = None
    nfe: NFE = field(default_factory=NFE)
    _armed: bool = False
    _stack: list[_Eval] = field(default_factory=list)
    _t_start: float = math.inf
    _factors: dict[LayerAdapter, Factors] = field(default_factory=dict)

    @property
    def armed(self) -> bool:
        return self._armed

    @armed.setter
    def armed(self, value: bool) -> None:
        self._armed = value
        if not value:
            self._stack.clear()
            self._factors.clear()
            self._t_start = math.inf

    def forward_time(self, t: float) -> None:
        """A forward-solve evaluation: the solve's first time is the lowest one seen."""
        self._t_start = min(self._t_start, t)

    @property
    def active(self) -> bool:
        return self._armed and bool(self.adapters)

    @property
    def factors(self) -> dict[LayerAdapter, Factors]:
        """Factors of every solve recorded so far (closes the one in progress)."""
        self._close()
        return self._factors

    def observe(self, t: float, batch: int, records: list) -> None:
        """Record one adjoint evaluation at time ``t`` (hooks fill in ``B`` during its VJP)."""
        ours = set(self.adapters)
        records = [r for r in records if r[0] in ours and r[2].requires_grad]
        if not records:
            return
        if self._stack and t >= self._stack[0].t:
            self._close()  # back at the start time: a new backward solve
        while self._stack and self._stack[-1].t < t:
            self._stack.pop()  # a rejected step's (or the step probe's) evaluations
        ev = _Eval(t)
        self.batch_size = batch
        self.nfe.curvature += 1
        with torch.no_grad():
            for adapter, inputs, output in records:
                z = adapter.input_rows(subsample(inputs, adapter.locations(output))).detach()
                entry = ev.zz.setdefault(adapter, [0.0, 0])
                entry[0] = entry[0] + z.t() @ z
                entry[1] += z.shape[0]
                ev.locations[adapter] = ev.locations.get(adapter, 0) + adapter.locations(output)
                output.register_hook(self._grad_hook(ev, adapter))
        self._stack.append(ev)

    @staticmethod
    def _grad_hook(ev: _Eval, adapter: LayerAdapter) -> Any:
        def hook(g: Tensor) -> None:
            with torch.no_grad():
                rows = adapter.output_rows(g).detach()
                entry = ev.gg.setdefault(adapter, [0.0, 0])
                entry[0] = entry[0] + rows.t() @ rows
                entry[1] += rows.shape[0]

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
        grid, dt = uniform_grid(t_lo, t_hi, self.grid_size)
        scale2 = self.batch_size**2 / (self.horizon or (t_hi - t_lo))  # q = a / sqrt(T) (§3.2)
        weights = [0.0] * len(nodes)
        for k in range(1, len(nodes)):
            hi, lo = nodes[k - 1], nodes[k]  # decreasing time
            if hi.t != lo.t:
                w_lo, w_hi = segment_weights(grid, dt, lo.t, hi.t)
                weights[k] += w_lo
                weights[k - 1] += w_hi
        for e, w in zip(nodes, weights):
            if w <= 0.0:
                continue
            for adapter, (zz, nz) in e.zz.items():
                gg, ng = e.gg.get(adapter, (None, 0))
                if gg is None or not ng:
                    continue
                A, B = w * zz / nz, w * scale2 * gg / ng
                acc = self._factors.get(adapter)
                if acc is None:
                    self._factors[adapter] = Factors(A, B, e.locations[adapter], self.batch_size)
                else:
                    acc.A, acc.B = acc.A + A, acc.B + B


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
        self.sampler = TapSampler()

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        s = self.sampler
        if not (s.active and torch.is_grad_enabled() and z.requires_grad and z.is_leaf):
            if s.active and not torch.is_grad_enabled():
                s.forward_time(float(t))
            return self.func(t, z)
        with recording() as records:
            out = self.func(t, z)
        batch = math.prod(z.shape[:-1]) if z.dim() > 1 else 1
        s.observe(float(t.detach()), batch, records)
        return out
