"""Where Kronecker factors come from: the :class:`CurvatureSource` interface and its plumbing.

Three sources feed :class:`~torchdyn_snopt.SNOptPreconditioner`:

- :class:`~torchdyn_snopt.curvature.sampler.CurvatureSampler`: layers inside a snopt
  ``NeuralODE``, sampled by the sensitivity's backward solve (eq. 13, Alg. 1 l.4-9);
- :class:`~torchdyn_snopt.cde.TapSampler`: layers inside a ``torchcde.cdeint`` function
  wrapped in a :class:`~torchdyn_snopt.CurvatureTap`, sampled in torchdiffeq's adjoint;
- :class:`~torchdyn_snopt.curvature.outer.OuterFactors`: layers outside the ODEs
  (``full_precond=True``), ordinary K-FAC factors from the usual backward.

The two ODE sources receive their instructions through a :class:`CurvatureRequest` that the
preconditioner creates (which layers, grid size, armed or not) and return their factors
through the same object, so neither side writes the other's attributes. Both integrate the
factors over time on a uniform grid with one helper, :class:`NodeChain`, and sum them with
:class:`FactorSum`.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch
from torch import Tensor

from torchdyn_snopt.curvature.base import LayerAdapter, sketch_of
from torchdyn_snopt.curvature.capture import Recorder


@dataclass
class Factors:
    """Accumulated ``Ā`` (``d_in × d_in``), ``B̄`` (``d_out × d_out``) of one layer, plus what
    the update needs to scale them: ``locations`` (positions sharing the weight, ``L`` in
    ``m = L·λ_B λ_Aᵀ``) and ``batch_size`` (samples of the pass that produced them).

    ``rows``: optional ``(r, d_in)`` matrix ``R`` with ``Ā = RᵀR`` and ``r < d_in`` (a layer
    outside the ODEs seen by fewer input rows than its width, e.g. a head on a batch of 128):
    the eigenbasis then comes from a QR of ``Rᵀ`` instead of an eigh of ``Ā``.

    ``probe_A``, ``probe_B``: when set (``n × k``, a thin basis ``Ω`` of the last
    ``refresh="power"`` refresh), ``A`` (or ``B``) is not the factor ``F`` but its sketch
    ``[F Ω, diag F]`` (``n × (k + 1)``; :func:`~torchdyn_snopt.curvature.base.sketch_moment`),
    all the next power refresh needs (:func:`~torchdyn_snopt.curvature.eigenbasis.from_sketch`).
    """

    A: Tensor
    B: Tensor
    locations: int = 1
    batch_size: int = 1
    rows: Tensor | None = None
    probe_A: Tensor | None = None
    probe_B: Tensor | None = None

    def plus(self, other: Factors) -> Factors:
        """``self + other`` (``other``'s ``locations``, ``batch_size``): a complete factor
        added to a sketched one is sketched first with the same probe."""
        A = _plus(self.A, self.probe_A, other.A, other.probe_A)
        B = _plus(self.B, self.probe_B, other.B, other.probe_B)
        probe_A = self.probe_A if self.probe_A is not None else other.probe_A
        probe_B = self.probe_B if self.probe_B is not None else other.probe_B
        return Factors(A, B, other.locations, other.batch_size, None, probe_A, probe_B)


#: The probes ``(Ω_A, Ω_B)`` of a layer whose factors are sketched (None: complete factor).
Probes = tuple[Tensor | None, Tensor | None]


def _plus(x: Tensor, px: Tensor | None, y: Tensor, py: Tensor | None) -> Tensor:
    if px is None and py is not None:
        x = sketch_of(x, py)
    elif px is not None and py is None:
        y = sketch_of(y, px)
    elif px is not None and py is not None and px is not py and not torch.equal(px, py):
        raise ValueError("sketches of one factor with different probes cannot be added")
    return x + y


@dataclass
class RowMoments:
    """Running ``Σ r rᵀ`` (``d × d``) over the rows ``r`` seen so far and how many rows."""

    sum: Tensor | None = None
    rows: int = 0

    def add(self, rows: Tensor) -> None:
        """Add the rows of an ``(n, d)`` matrix."""
        moment = rows.t() @ rows
        self.sum = 0.0 + moment if self.sum is None else self.sum + moment
        self.rows += rows.shape[0]

    def total(self) -> Tensor:
        """``Σ r rᵀ``; ``RuntimeError`` before any row was added."""
        if self.sum is None:
            raise RuntimeError("no rows were added")
        return self.sum


class FactorSum:
    """Weighted factors summed per layer (quadrature of eq. 13 over nodes, solves and calls).

    ``locations`` and ``batch_size`` of a layer are the latest ones added.
    """

    def __init__(self) -> None:
        self._factors: dict[LayerAdapter, Factors] = {}

    def add(
        self,
        adapter: LayerAdapter,
        A: Tensor,
        B: Tensor,
        locations: int,
        batch: int,
        probes: Probes = (None, None),
    ) -> None:
        """Add ``A``, ``B`` (already weighted; fresh tensors, the first ones are kept as is);
        ``probes``: see :attr:`Factors.probe_A` (the same for every call of one layer)."""
        acc = self._factors.get(adapter)
        if acc is None:
            self._factors[adapter] = Factors(A, B, locations, batch, None, *probes)
        elif acc.probe_A is probes[0] and acc.probe_B is probes[1]:
            acc.A += A
            acc.B += B
            acc.locations, acc.batch_size = locations, batch
        else:
            self._factors[adapter] = acc.plus(Factors(A, B, locations, batch, None, *probes))

    def take(self) -> dict[LayerAdapter, Factors]:
        """The sums so far; the accumulator is empty afterwards."""
        out, self._factors = self._factors, {}
        return out

    def view(self) -> dict[LayerAdapter, Factors]:
        """The sums so far, without taking them."""
        return dict(self._factors)

    def clear(self) -> None:
        self._factors = {}

    def __len__(self) -> int:
        return len(self._factors)

    def __iter__(self) -> Iterator[LayerAdapter]:
        return iter(self._factors)


@dataclass
class CurvatureRequest:
    """What the preconditioner asks of one ODE source, and what the source hands back.

    Created and configured by the preconditioner: ``adapters`` (the layers to sample),
    ``recorder`` (whose hooks see those layers' calls), ``grid_size`` (points of the uniform
    grid of eq. 13) and ``armed`` (whether the next backward passes sample). Written by the
    source (the sensitivity's backward solve or a tap): ``factors`` (the integrals so far) and
    ``batch_size`` (samples of the latest training forward pass).

    ``probes`` (configuration, by layer): sample the sketch of a factor instead of the factor
    (:attr:`Factors.probe_A`); a source may ignore it and hand back complete factors.
    """

    adapters: list[LayerAdapter]
    recorder: Recorder
    grid_size: int = 100
    armed: bool = False
    probes: dict[LayerAdapter, Probes] = field(default_factory=dict)
    batch_size: int = 1
    factors: FactorSum = field(default_factory=FactorSum)

    @property
    def active(self) -> bool:
        """Whether a backward pass now samples: armed, with at least one layer."""
        return self.armed and bool(self.adapters)


class CurvatureSource(ABC):
    """One place Kronecker factors come from; the preconditioner sees only this interface.

    Lifecycle per refresh: ``arm(True)`` before the backward passes that should sample,
    ``take(passes)`` at the step after them, ``arm(False)`` once the refresh is committed.
    """

    @abstractmethod
    def arm(self, armed: bool) -> None:
        """Start (``True``) or stop sampling; stopping drops what was not taken."""

    @abstractmethod
    def take(self, passes: int) -> dict[LayerAdapter, Factors]:
        """The factors recorded since the last call, as one backward pass's (``passes`` >= 1
        backward passes ran since: gradient accumulation); cleared afterwards."""

    @abstractmethod
    def batch_size(self, adapter: LayerAdapter) -> int | None:
        """Samples of the latest training pass through ``adapter``'s layer, None if not ours."""

    def remove(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Detach whatever this source attached to the model (default: nothing)."""


class IntegralSource(CurvatureSource):
    """A source whose factors are time integrals over ODE solves, handed over in
    :attr:`request` (:class:`CurvatureSampler`, :class:`TapSampler`)."""

    request: CurvatureRequest

    def arm(self, armed: bool) -> None:
        self.request.armed = armed
        if not armed:
            self.request.factors.clear()

    def integrals(self) -> dict[LayerAdapter, Factors]:
        """The integrals summed over every solve since the last call; cleared afterwards."""
        return self.request.factors.take()

    def take(self, passes: int) -> dict[LayerAdapter, Factors]:
        return collect([self], passes)

    def batch_size(self, adapter: LayerAdapter) -> int | None:
        return self.request.batch_size if adapter in self.request.adapters else None


def collect(sources: Sequence[CurvatureSource], passes: int) -> dict[LayerAdapter, Factors]:
    """Every source's factors since arming, by layer, as one backward pass's.

    A layer in several integral sources (one field in two ODEs) integrates over all of them:
    their sums are added, then divided by ``passes`` (``k`` passes, each loss a mean over its
    own samples, give the factors of one pass over the concatenated batch). Other sources
    average over passes themselves (:meth:`CurvatureSource.take`).
    """
    total: dict[LayerAdapter, Factors] = {}
    for s in sources:
        if isinstance(s, IntegralSource):
            for adapter, f in s.integrals().items():
                acc = total.get(adapter)
                if acc is None:
                    total[adapter] = Factors(
                        f.A, f.B, f.locations, f.batch_size, None, f.probe_A, f.probe_B
                    )
                else:
                    summed = acc.plus(f)
                    summed.locations, summed.batch_size = acc.locations, acc.batch_size
                    total[adapter] = summed
    if passes > 1:
        for f in total.values():
            f.A, f.B = f.A / passes, f.B / passes
    for s in sources:
        if not isinstance(s, IntegralSource):
            total.update(s.take(passes))
    return total


# --- quadrature on the uniform grid (eq. 13) ------------------------------------------------

P = TypeVar("P")


@dataclass
class Node(Generic[P]):
    """A sampled time ``t`` with what was recorded there and its quadrature weight (in the
    time units of ``t``; final once :class:`NodeChain` hands the node back)."""

    t: float
    payload: P
    weight: float = 0.0


class NodeChain(Generic[P]):
    """Quadrature weights of sampled nodes on the uniform grid ``t_j = t0 + jΔt``.

    ``A_n(t)`` and ``B_n(t)`` are linear between consecutive nodes, so the grid sum
    ``Σ_j A_n(t_j) Δt`` puts on each node the weight of the grid points in its two
    neighbouring segments. Nodes arrive in time order (increasing or decreasing);
    :meth:`push` returns the previous node once both its segments are known, :meth:`end`
    returns the last one and starts a new chain (an output time where the adjoint jumps).
    Equal consecutive times bound no segment.
    """

    def __init__(self, t0: float, t1: float, size: int) -> None:
        lo, hi = min(t0, t1), max(t0, t1)
        self.grid, self.dt = uniform_grid(lo, hi, size)
        self._pending: Node[P] | None = None

    def push(self, t: float, payload: P) -> Node[P] | None:
        """Add a node at time ``t``; returns the node it closes (the previous one), if any."""
        new = Node(t, payload)
        prev, self._pending = self._pending, new
        if prev is not None and prev.t != t:
            lo, hi = (new, prev) if t < prev.t else (prev, new)
            w_lo, w_hi = segment_weights(self.grid, self.dt, lo.t, hi.t)
            lo.weight += w_lo
            hi.weight += w_hi
        return prev

    def end(self) -> Node[P] | None:
        """Close the chain; returns its last node, if any."""
        last, self._pending = self._pending, None
        return last


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
