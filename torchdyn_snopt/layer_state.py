"""What SNOpt keeps for one layer between steps, and the per-layer math of eq. 14.

Per layer (``d_out × d_in`` weight matrix ``W``, bias as its last column): the Kronecker
eigenbasis ``U_A`` (``d_in × d_in``), ``U_B`` (``d_out × d_out``) of the last refresh, the
eigenvalues it came with, and the running second moment ``m`` (``d_out × d_in``) of the
gradient in that basis (EKFAC, George et al. 2018)::

    G' = U_Bᵀ G U_A,   m ← α m + (1 - α)·batch·G'²,   P = U_B [G' / (m + λ + γ)] U_Aᵀ

with the damping ``λ = eps·mean(m)`` (:attr:`Damping.RELATIVE`, the default) or ``λ = eps``
(:attr:`Damping.FIXED`, the paper's Tikhonov damping). :class:`LayerState` owns these.

Thin bases (:attr:`~torchdyn_snopt.curvature.eigenbasis.Refresh.POWER` on factors wider than
``POWER_RANK``): a side's basis ``V`` is ``n × k`` with ``k < n`` and its complement, never
formed, is one isotropic *tail* coordinate. ``G`` splits into the blocks ``P_B G P_A``,
``P_B G Q_A``, ``Q_B G P_A``, ``Q_B G Q_A`` (``P = V Vᵀ``, ``Q = I − P``) and ``m`` has one
extra row (thin ``U_B``) and/or column (thin ``U_A``): the mean of ``G'²`` over the tail's
directions, e.g. ``m[i, k_A] ← α m[i, k_A] + (1 − α)·batch·‖(V_Bᵀ G Q_A)[i]‖² / (n_A − k_A)``.
That mean does not depend on which orthonormal basis of the complement is used, so this is
EKFAC in any complete basis ``[V, C]`` whose second moment is shared across the complement's
directions (which are exchangeable: the refresh gives them one eigenvalue). ``P`` is the sum
of the blocks, each divided by its denominator; O(n·k) per thin side, and relative damping
takes the mean of ``m`` over all ``d_out·d_in`` directions (the tail entries weighted by
their multiplicity), as with a complete basis. The price: the tail's directions are no longer
normalised one by one. Measured on the ``bench refresh-cost`` regression (``32 → 1024 → 32``,
SNOpt's defaults, 60 steps, 5 seeds), the final loss relative to ``refresh="exact"`` was
0.95-0.97x on 2 seeds and 1.5-2.7x on 3 (a complete basis with a per-direction tail: 0.6-0.9x).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from torchdyn_snopt.config import Damping
from torchdyn_snopt.curvature.base import LayerAdapter
from torchdyn_snopt.curvature.eigenbasis import (
    Eigenpairs,
    Refresh,
    eigh_from_rows,
    from_sketch,
    is_thin,
    refresh_eigh,
)
from torchdyn_snopt.curvature.source import Factors


@dataclass
class Eigenbasis:
    """Kronecker eigenbasis of one layer and the running second moment ``m`` in it.

    ``lamA``, ``lamB``: the eigenvalues the bases came with (the warm start of the next
    :attr:`Refresh.POWER` refresh; None from a checkpoint that predates them). A thin basis
    (``n × k``, ``k < n``) has ``k + 1`` eigenvalues and ``m`` a tail row or column (module).
    """

    UA: Tensor
    UB: Tensor
    m: Tensor
    lamA: Tensor | None = None
    lamB: Tensor | None = None

    def pairs(self) -> tuple[Eigenpairs | None, Eigenpairs | None]:
        """``(λ_A, U_A)`` and ``(λ_B, U_B)``, each None when its eigenvalues are unknown."""
        return (
            None if self.lamA is None else (self.lamA, self.UA),
            None if self.lamB is None else (self.lamB, self.UB),
        )

    @property
    def thin(self) -> bool:
        """Whether either side's basis is thin (see the module)."""
        return is_thin(self.UA) or is_thin(self.UB)

    @classmethod
    def from_pairs(cls, f: Factors, pair_a: Eigenpairs, pair_b: Eigenpairs) -> Eigenbasis:
        """The basis of fresh eigenpairs of ``Ā``, ``B̄``, with ``m = L·λ_B λ_Aᵀ``."""
        (lam_a, UA), (lam_b, UB) = pair_a, pair_b
        return cls(UA, UB, torch.outer(lam_b, lam_a) * f.locations, lam_a, lam_b)


def priors(eig: Eigenbasis | None) -> tuple[Eigenpairs | None, Eigenpairs | None]:
    """The warm starts of a refresh: ``eig``'s eigenpairs, or None."""
    return (None, None) if eig is None else eig.pairs()


def factor_pairs(
    f: Factors, refresh: Refresh = Refresh.EXACT, prior: Eigenbasis | None = None
) -> tuple[Eigenpairs, Eigenpairs]:
    """(eigenvalues, eigenvectors) of ``Ā`` (from its sketch or its rows when it has them) and
    of ``B̄`` (from its sketch when it has one); ``refresh`` and the layer's previous eigenbasis
    ``prior``: see :func:`refresh_eigh`."""
    prior_a, prior_b = priors(prior)
    if f.probe_A is not None:
        pair_a = from_sketch(f.A, f.probe_A)
    elif f.rows is not None:
        pair_a = eigh_from_rows(f.rows)
    else:
        pair_a = refresh_eigh(f.A, prior_a, refresh)
    if f.probe_B is not None:
        return pair_a, from_sketch(f.B, f.probe_B)
    return pair_a, refresh_eigh(f.B, prior_b, refresh)


def eigen_from_factors(f: Factors) -> Eigenbasis:
    """Fresh eigenbasis and ``m = L·λ_B λ_Aᵀ`` from sampled factors."""
    return Eigenbasis.from_pairs(f, *factor_pairs(f))


def project(G: Tensor, eig: Eigenbasis) -> Tensor:
    """``U_Bᵀ G U_A``: a layer matrix in the Kronecker eigenbasis."""
    return eig.UB.t() @ G @ eig.UA


def solve_in_eigenbasis(G1: Tensor, eig: Eigenbasis, denom: Tensor) -> Tensor:
    """``U_B (G' / denom) U_Aᵀ``: eq. 14's ``B̄⁻¹ G Ā⁻ᵀ`` with the damped eigenvalues ``denom``."""
    return eig.UB @ (G1 / denom) @ eig.UA.t()


@dataclass
class Step:
    """One layer's proposed update: the preconditioned gradient ``P``, the second moment
    ``m`` to keep if the step is committed, and the raw gradient ``G`` (all ``d_out × d_in``)."""

    P: Tensor
    m: Tensor
    G: Tensor


@dataclass
class LayerState:
    """Everything the preconditioner keeps for one layer: its adapter and eigenbasis.

    :meth:`damped` is where the damping enters the update and :meth:`refreshed` where the
    state carries over a refresh.
    """

    adapter: LayerAdapter
    eigen: Eigenbasis

    def refreshed(self, eigen: Eigenbasis) -> LayerState:
        """This layer with a new eigenbasis (everything else carried over)."""
        return replace(self, eigen=eigen)

    @staticmethod
    def damped(
        m: Tensor, eps: float, weight_decay: float, damping: Damping, weights: Tensor | None = None
    ) -> Tensor:
        """The denominator of eq. 14 in the eigenbasis: ``m + eps + γ`` (:attr:`Damping.FIXED`,
        Tikhonov, §3.2) or ``m + eps·mean(m) + γ`` (:attr:`Damping.RELATIVE`: ``eps`` is a
        fraction of the layer's mean second moment, whatever the scale of its gradients).

        A layer with ``m = 0`` (no gradient yet, e.g. zero-initialised gates) has ``G' = 0``
        (``m ≥ (1 − α)·batch·G'²``); its relative denominator is floored at the dtype's
        smallest normal number so that its step is ``0``, not ``0/0``.

        ``weights``: how many directions each entry of ``m`` stands for (thin bases: a tail
        entry stands for the complement's), so the relative damping's mean is over them all."""
        if damping is Damping.RELATIVE:
            mean = m.mean() if weights is None else (m * weights).sum() / weights.sum()
            return (m + (eps * mean + weight_decay)).clamp_min(torch.finfo(m.dtype).tiny)
        return m + eps + weight_decay

    def propose(
        self,
        batch: int,
        alpha: float,
        eps: float,
        weight_decay: float,
        damping: Damping = Damping.FIXED,
    ) -> Step:
        """Precondition the layer's current gradient (eq. 14); changes nothing.

        ``batch``: samples behind the gradient (``m`` is on the per-sample scale); ``alpha``:
        running-average weight of ``m``; ``eps``, ``damping``: see :meth:`damped`;
        ``weight_decay``: ``γ``, adding ``γθ`` to the gradient and ``γ`` to the damping
        (Remark, §3.2).
        """
        eig, G = self.eigen, self.adapter.grad_matrix()
        if eig.thin:
            return self._propose_thin(G, batch, alpha, eps, weight_decay, damping)
        G1 = project(G, eig)
        m = eig.m * alpha + (1.0 - alpha) * batch * G1.square()
        if weight_decay:
            G1 = G1 + weight_decay * project(self.adapter.param_matrix(), eig)
        denom = self.damped(m, eps, weight_decay, damping)
        return Step(solve_in_eigenbasis(G1, eig, denom), m, G)

    def _propose_thin(
        self,
        G: Tensor,
        batch: int,
        alpha: float,
        eps: float,
        weight_decay: float,
        damping: Damping,
    ) -> Step:
        """:meth:`propose` with a thin side (module docstring): blocks instead of ``U_Bᵀ G U_A``."""
        eig = self.eigen
        S = tail_blocks(G, eig.UA, eig.UB).squares()
        m = eig.m * alpha + (1.0 - alpha) * batch * S
        direction = G + weight_decay * self.adapter.param_matrix() if weight_decay else G
        weights = torch.outer(multiplicities(eig.UB), multiplicities(eig.UA)).to(m.dtype)
        denom = self.damped(m, eps, weight_decay, damping, weights)
        return Step(tail_blocks(direction, eig.UA, eig.UB).solve(denom), m, G)

    def commit(self, step: Step) -> None:
        """Write the (possibly rescaled) ``step.P`` into ``.grad`` and keep ``step.m``."""
        self.adapter.set_grad_matrix(step.P)
        self.eigen.m = step.m


def multiplicities(U: Tensor) -> Tensor:
    """Directions per eigen-coordinate of a side: 1 per column, and ``n − k`` for a thin
    basis's tail."""
    n, k = U.shape
    ones = torch.ones(k, dtype=U.dtype, device=U.device)
    return torch.cat([ones, ones.new_full((1,), n - k)]) if k < n else ones


@dataclass
class TailBlocks:
    """A layer matrix ``G`` in a basis with thin sides (module docstring).

    ``core = U_Bᵀ G U_A``; ``row_tail = U_Bᵀ G Q_A`` (thin ``U_A``), ``col_tail = Q_B G U_A``
    (thin ``U_B``), ``tail = Q_B G Q_A`` (both thin), each None when its side is complete.
    """

    UA: Tensor
    UB: Tensor
    core: Tensor
    row_tail: Tensor | None
    col_tail: Tensor | None
    tail: Tensor | None

    def squares(self) -> Tensor:
        """``G'²`` with each tail coordinate the mean over its directions: ``(k_B [+1]) ×
        (k_A [+1])``."""
        (nA, kA), (nB, kB) = self.UA.shape, self.UB.shape
        S = self.core.square()
        if self.row_tail is not None:
            S = torch.cat([S, self.row_tail.square().sum(1, keepdim=True) / (nA - kA)], 1)
        if self.col_tail is not None:
            row = self.col_tail.square().sum(0, keepdim=True) / (nB - kB)
            if self.tail is not None:
                corner = self.tail.square().sum() / ((nB - kB) * (nA - kA))
                row = torch.cat([row, corner.reshape(1, 1)], 1)
            S = torch.cat([S, row], 0)
        return S

    def solve(self, denom: Tensor) -> Tensor:
        """Each block divided by its entries of ``denom`` (shape of :meth:`squares`), summed
        back into a ``d_out × d_in`` matrix."""
        kA, kB = self.UA.shape[1], self.UB.shape[1]
        P = (self.UB @ (self.core / denom[:kB, :kA])) @ self.UA.t()
        if self.row_tail is not None:
            P = P + self.UB @ (self.row_tail / denom[:kB, kA:])
        if self.col_tail is not None:
            P = P + (self.col_tail / denom[kB:, :kA]) @ self.UA.t()
        if self.tail is not None:
            P = P + self.tail / denom[kB, kA]
        return P


def tail_blocks(G: Tensor, UA: Tensor, UB: Tensor) -> TailBlocks:
    """The blocks of ``G`` (``d_out × d_in``) for bases ``U_A`` (``d_in × k_A``) and ``U_B``
    (``d_out × k_B``), either or both thin; O(d_out·d_in·(k_A + k_B))."""
    X = UB.t() @ G  # k_B × d_in
    core = X @ UA
    row_tail = X - core @ UA.t() if is_thin(UA) else None
    col_tail = tail = None
    if is_thin(UB):
        col_tail = G @ UA - UB @ core
        if is_thin(UA):
            tail = (G - UB @ X) - col_tail @ UA.t()
    return TailBlocks(UA, UB, core, row_tail, col_tail, tail)
