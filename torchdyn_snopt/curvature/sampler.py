"""Curvature of one snopt ODE, gathered during its backward solve (eq. 13, Alg. 1 l.4-9).

Sampling happens at the solver's *accepted* backward steps (plus each interval's end points):
at such a node ``t_k`` one extra evaluation of the vector field records each layer's input
``z`` and, by a vector-Jacobian product with ``q = a / sqrt(t1 - t0)`` (Gauss-Newton terminal
curvature, §3.2), the gradient ``g = (∂F/∂h)ᵀ q`` at its output. For a CNF that evaluation
is the field ``f(t, x)`` alone, without the trace estimator (:mod:`torchdyn_snopt.cnf`).
``A_n(t)`` and ``B_n(t)`` are linear between nodes, and the uniform grid ``t_j = t0 + jΔt``
(``j = 0..G-1``, ``Δt = (t1 - t0)/(G - 1)``) is read off that interpolant:

    Ā_n = Σ_j A_n(t_j) Δt,      B̄_n = Σ_j B_n(t_j) Δt.

Each node therefore carries the weight of the grid points in its two neighbouring segments and
is evaluated once, only if that weight is positive, and only when its segment is closed, so the
memory is O(1) in the number of solver steps and no solver restart is ever forced.

Many short solves (ODE-RNN, §4): each solve's ``Ā``, ``B̄`` integrate over its own span, so
summing the solves of one iteration weights each by its time span. Set :attr:`horizon` to the
whole sequence's time range so that ``q = a / sqrt(horizon)`` is the Gauss-Newton vector of the
sequence (default None: each solve's own ``t1 - t0``).

Rows: ``B`` uses the whole batch; ``A`` at most :data:`A_ROWS` rows (see there).

Scale convention (IMPLEMENTATION-NOTES): ``A_n(t) = E[z̃ z̃ᵀ]`` and ``B_n(t) = E[g gᵀ]`` are
means over the batch (and spatial locations for convolutions), and ``g`` is multiplied by the
batch size so it is the per-sample, not the batch-mean, gradient. With ``t1 - t0 = 1`` the
product ``Ā ⊗ B̄`` is then on the scale of per-sample squared gradients, where ``eps ≈ 0.05``
damping is meaningful.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch import Tensor

from torchdyn_snopt.cnf import without_trace
from torchdyn_snopt.curvature.base import LayerAdapter, second_moment
from torchdyn_snopt.curvature.capture import recording

#: Input rows (samples × locations) per node and layer used for ``A``; beyond it only the
#: batch's first ``ceil(A_ROWS / locations)`` samples are used (no fresh random draw: with a
#: shuffled minibatch the first samples are themselves a uniform random subset, so ``A`` stays
#: unbiased; with an ordered batch they are not), keeping its cost independent of the batch.
A_ROWS = 2048


@dataclass
class Factors:
    """Accumulated ``Ā``, ``B̄`` of one layer plus what the update needs to scale them.

    ``rows``: optional ``(r, d_in)`` matrix ``R`` with ``Ā = RᵀR`` and ``r < d_in`` (a layer
    outside the ODEs seen by fewer input rows than its width, e.g. a head on a batch of 128):
    the eigenbasis then comes from a QR of ``Rᵀ`` instead of an eigh of ``Ā``.
    """

    A: Tensor
    B: Tensor
    locations: int = 1
    batch_size: int = 1
    rows: Tensor | None = None


@dataclass
class _Node:
    t: float
    x: Tensor
    a: Tensor
    weight: float = 0.0


@dataclass
class NFE:
    """Function evaluations of the vector field, by purpose (Table 6 reports NFE)."""

    forward: int = 0
    backward: int = 0
    curvature: int = 0

    def reset(self) -> None:
        self.forward = self.backward = self.curvature = 0


@dataclass
class CurvatureSampler:
    """Per-ODE sampling state; the optimizer arms it and reads :attr:`factors`."""

    adapters: list[LayerAdapter] = field(default_factory=list)
    armed: bool = False
    grid_size: int = 100
    batch_size: int = 1
    horizon: float | None = None
    factors: dict[LayerAdapter, Factors] = field(default_factory=dict)
    nfe: NFE = field(default_factory=NFE)

    # --- state of the backward solve in progress -----------------------------------------
    _grid: list[float] = field(default_factory=list)
    _dt: float = 0.0
    _scale: float = 1.0
    _batch: int = 1
    _pending: _Node | None = None
    _vf: nn.Module | None = None

    @property
    def active(self) -> bool:
        return self.armed and bool(self.adapters)

    def begin(self, vf: nn.Module, t0: float, t1: float, batch_size: int) -> None:
        """Start sampling a backward solve between times ``t0`` and ``t1`` (either order)."""
        t0, t1 = min(t0, t1), max(t0, t1)
        span = t1 - t0
        self._grid, self._dt = uniform_grid(t0, t1, self.grid_size)
        norm = self.horizon if self.horizon else span
        self._scale = batch_size / math.sqrt(norm)  # q = a / sqrt(t1 - t0), per-sample (§3.2)
        self._batch, self._vf, self._pending = batch_size, vf, None

    def node(self, t: float, x: Tensor, a: Tensor) -> None:
        """An accepted backward state at true time ``t`` (consecutive nodes bound a segment)."""
        new = _Node(t, x, a)
        prev = self._pending
        if prev is not None:
            if prev.t != t:
                lo, hi = (new, prev) if t < prev.t else (prev, new)
                w_lo, w_hi = self._segment_weights(lo.t, hi.t)
                lo.weight += w_lo
                hi.weight += w_hi
            self._finish(prev)
        self._pending = new

    def end_interval(self) -> None:
        """Close the current ``t_span`` interval (the adjoint may jump before the next)."""
        if self._pending is not None:
            self._finish(self._pending)
        self._pending = None

    def finish(self) -> None:
        self.end_interval()
        self._vf = None

    # --- internals ----------------------------------------------------------------------
    def _segment_weights(self, lo: float, hi: float) -> tuple[float, float]:
        return segment_weights(self._grid, self._dt, lo, hi)

    def _finish(self, node: _Node) -> None:
        if node.weight <= 0.0:
            return
        for adapter, (A, B, locations) in self._evaluate(node).items():
            acc = self.factors.get(adapter)
            if acc is None:
                self.factors[adapter] = Factors(
                    node.weight * A, node.weight * B, locations, self._batch
                )
            else:
                acc.A += node.weight * A
                acc.B += node.weight * B
                acc.locations, acc.batch_size = locations, self._batch

    def _evaluate(self, node: _Node) -> dict[LayerAdapter, tuple[Tensor, Tensor, int]]:
        """One evaluation of F at the node: ``A_n(t_k)``, ``B_n(t_k)`` per adapter (eq. 13)."""
        vf = self._vf
        if vf is None:
            raise RuntimeError("curvature node outside a backward solve (no vector field set)")
        ours = set(self.adapters)
        t = torch.as_tensor(node.t, dtype=node.x.dtype, device=node.x.device)
        # A CNF contributes f(t, x) only: no trace-estimator passes in the factors (§4).
        with torch.enable_grad(), without_trace(vf), recording() as records:
            out = vf(t, node.x.detach())
        self.nfe.curvature += 1
        records = [r for r in records if r[0] in ours and r[2].requires_grad]
        if not records:
            return {}
        grads = torch.autograd.grad(
            out, [r[2] for r in records], grad_outputs=node.a * self._scale, allow_unused=True
        )
        rows: dict[LayerAdapter, tuple[list[Tensor], list[Tensor], int]] = {}
        with torch.no_grad():
            for (adapter, inputs, output), g in zip(records, grads):
                if g is None:
                    g = torch.zeros_like(output)
                zs, gs, loc = rows.setdefault(adapter, ([], [], 0))
                zs.append(adapter.input_rows(subsample(inputs, adapter.locations(output))))
                gs.append(adapter.output_rows(g))
                rows[adapter] = (zs, gs, loc + adapter.locations(output))
            result = {}
            for adapter, (zs, gs, loc) in rows.items():
                z, g = torch.cat(zs), torch.cat(gs)
                result[adapter] = (second_moment(z), second_moment(g), loc)
        return result


def segment_weights(grid: list[float], dt: float, lo: float, hi: float) -> tuple[float, float]:
    """Weights of the nodes at ``lo`` and ``hi`` from the points of the uniform ``grid`` (step
    ``dt``) in ``[lo, hi)`` (``[lo, hi]`` for the top segment), by linear interpolation (eq. 13)."""
    i0 = bisect.bisect_left(grid, lo)
    top = hi >= grid[-1]
    i1 = bisect.bisect_right(grid, hi) if top else bisect.bisect_left(grid, hi)
    w_lo = w_hi = 0.0
    for tj in grid[i0:i1]:
        lam = (tj - lo) / (hi - lo)
        w_lo += (1.0 - lam) * dt
        w_hi += lam * dt
    return w_lo, w_hi


def uniform_grid(t0: float, t1: float, size: int) -> tuple[list[float], float]:
    """``size`` equally spaced times from ``t0`` to ``t1`` and their spacing."""
    span = t1 - t0
    return [t0 + span * j / (size - 1) for j in range(size)], span / (size - 1)


def subsample(inputs: tuple, locations: int) -> tuple:
    """The first ``ceil(A_ROWS / locations)`` samples of the module's first input."""
    first = inputs[0]
    keep = max(1, -(-A_ROWS // max(locations, 1)))
    if first.dim() < 2 or first.shape[0] <= keep:
        return inputs
    return (first[:keep], *inputs[1:])
