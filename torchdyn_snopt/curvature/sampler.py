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
summing the solves of one iteration weights each by its time span. Set the problem's
horizon (:func:`torchdyn_snopt.adjoint.set_horizon`) to the whole sequence's time range so
that ``q = a / sqrt(horizon)`` is the Gauss-Newton vector of the sequence (default None: each
solve's own ``t1 - t0``).

Who does what: the preconditioner owns a :class:`CurvatureSampler` per snopt ODE (the
:class:`~torchdyn_snopt.curvature.source.CurvatureSource`) and binds its
:class:`~torchdyn_snopt.curvature.source.CurvatureRequest` to the ODE problem
(:func:`torchdyn_snopt.adjoint.bind_request`); each backward solve of an armed request runs a
:class:`SolveSampling` that adds its integrals to ``request.factors``.

Rows: ``B`` uses the whole batch; ``A`` at most :data:`A_ROWS` rows (see there).

Sketches: for a layer in ``request.probes`` (``refresh="power"``, a side whose basis is thin)
the node adds ``[M Ω, diag M]`` for that side's moment ``M`` instead of ``M`` itself
(:func:`~torchdyn_snopt.curvature.base.sketch_moment`): O(rows·n·k) instead of O(rows·n²), the
same means over rows and weights, so ``Ā`` and its sketch follow one scale convention.

Scale convention (IMPLEMENTATION-NOTES): ``A_n(t) = E[z̃ z̃ᵀ]`` and ``B_n(t) = E[g gᵀ]`` are
means over the batch (and spatial locations for convolutions), and ``g`` is multiplied by the
batch size so it is the per-sample, not the batch-mean, gradient. With ``t1 - t0 = 1`` the
product ``Ā ⊗ B̄`` is then on the scale of per-sample squared gradients, where ``eps ≈ 0.05``
damping is meaningful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from torchdyn_snopt.cnf import without_trace
from torchdyn_snopt.curvature.base import LayerAdapter, sketch_moment
from torchdyn_snopt.curvature.source import (
    CurvatureRequest,
    Factors,
    IntegralSource,
    Node,
    NodeChain,
    segment_weights,
    uniform_grid,
)

__all__ = [
    "A_ROWS",
    "NFE",
    "CurvatureSampler",
    "Factors",
    "SolveSampling",
    "segment_weights",
    "subsample",
    "uniform_grid",
]

#: Input rows (samples × locations) per node and layer used for ``A``; beyond it only the
#: batch's first ``ceil(A_ROWS / locations)`` samples are used (no fresh random draw: with a
#: shuffled minibatch the first samples are themselves a uniform random subset, so ``A`` stays
#: unbiased; with an ordered batch they are not), keeping its cost independent of the batch.
A_ROWS = 2048


@dataclass
class NFE:
    """Function evaluations of the vector field, by purpose (Table 6 reports NFE)."""

    forward: int = 0
    backward: int = 0
    curvature: int = 0

    def reset(self) -> None:
        self.forward = self.backward = self.curvature = 0


class CurvatureSampler(IntegralSource):
    """The curvature source of one snopt ODE: its :attr:`request`, bound to the problem by
    the preconditioner, collects what the problem's backward solves sample."""

    def __init__(self, request: CurvatureRequest) -> None:
        self.request = request


@dataclass
class _State:
    """The backward state at a node: ``x`` and the adjoint ``a``."""

    x: Tensor
    a: Tensor


class SolveSampling:
    """Sampling of one backward solve between times ``t0`` and ``t1`` (either order).

    Args:
        request: the armed request whose ``adapters`` are sampled and whose ``factors``
            receive this solve's ``Ā``, ``B̄``; its ``recorder`` sees the layers' calls.
        vf: the vector field evaluated at the nodes.
        batch_size: samples in the solve's batch.
        horizon: Gauss-Newton normalisation ``T`` of ``q = a / sqrt(T)`` (None: ``t1 - t0``).
        nfe: counters whose ``curvature`` entry counts the node evaluations.
    """

    def __init__(
        self,
        request: CurvatureRequest,
        vf: nn.Module,
        t0: float,
        t1: float,
        batch_size: int,
        horizon: float | None,
        nfe: NFE,
    ) -> None:
        self.request, self.vf, self.nfe, self.batch = request, vf, nfe, batch_size
        self.chain: NodeChain[_State] = NodeChain(t0, t1, request.grid_size)
        span = max(t0, t1) - min(t0, t1)
        self.scale = batch_size / math.sqrt(horizon if horizon else span)  # q = a/sqrt(T) (§3.2)

    def node(self, t: float, x: Tensor, a: Tensor) -> None:
        """An accepted backward state at true time ``t`` (consecutive nodes bound a segment)."""
        self._finish(self.chain.push(t, _State(x, a)))

    def end_interval(self) -> None:
        """Close the current ``t_span`` interval (the adjoint may jump before the next)."""
        self._finish(self.chain.end())

    def _finish(self, node: Node[_State] | None) -> None:
        """Evaluate a node whose weight is final (only if positive) and add its factors."""
        if node is None or node.weight <= 0.0:
            return
        w, add, probes = node.weight, self.request.factors.add, self.request.probes
        for adapter, (A, B, locations) in self._evaluate(node).items():
            add(adapter, w * A, w * B, locations, self.batch, probes.get(adapter, (None, None)))

    def _evaluate(self, node: Node[_State]) -> dict[LayerAdapter, tuple[Tensor, Tensor, int]]:
        """One evaluation of F at the node: ``A_n(t_k)``, ``B_n(t_k)`` per adapter (eq. 13)."""
        x, a = node.payload.x, node.payload.a
        ours = set(self.request.adapters)
        t = torch.as_tensor(node.t, dtype=x.dtype, device=x.device)
        # A CNF contributes f(t, x) only: no trace-estimator passes in the factors (§4).
        with torch.enable_grad(), without_trace(self.vf), self.request.recorder.recording() as rec:
            out = self.vf(t, x.detach())
        self.nfe.curvature += 1
        records = [r for r in rec if r[0] in ours and r[2].requires_grad]
        if not records:
            return {}
        grads = torch.autograd.grad(
            out, [r[2] for r in records], grad_outputs=a * self.scale, allow_unused=True
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
                probe_a, probe_b = self.request.probes.get(adapter, (None, None))
                result[adapter] = (sketch_moment(z, probe_a), sketch_moment(g, probe_b), loc)
        return result


def subsample(inputs: tuple, locations: int) -> tuple:
    """The first ``ceil(A_ROWS / locations)`` samples of the module's first input."""
    first = inputs[0]
    keep = max(1, -(-A_ROWS // max(locations, 1)))
    if first.dim() < 2 or first.shape[0] <= keep:
        return inputs
    return (first[:keep], *inputs[1:])
