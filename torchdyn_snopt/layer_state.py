"""What SNOpt keeps for one layer between steps, and the per-layer math of eq. 14.

Per layer (``d_out × d_in`` weight matrix ``W``, bias as its last column): the Kronecker
eigenbasis ``U_A`` (``d_in × d_in``), ``U_B`` (``d_out × d_out``) of the last refresh, the
eigenvalues it came with, and the running second moment ``m`` (``d_out × d_in``) of the
gradient in that basis (EKFAC, George et al. 2018)::

    G' = U_Bᵀ G U_A,   m ← α m + (1 - α)·batch·G'²,   P = U_B [G' / (m + λ + γ)] U_Aᵀ

with the damping ``λ = eps·mean(m)`` (:attr:`Damping.RELATIVE`, the default) or ``λ = eps``
(:attr:`Damping.FIXED`, the paper's Tikhonov damping). :class:`LayerState` owns these.

Thin bases (:attr:`~torchdyn_snopt.curvature.eigenbasis.Refresh.POWER` on factors wider than
``EXACT_UP_TO``): a side's eigenpairs are ``V`` (``n × k``, ``k < n``) and ``k + 1`` values, the
last one shared by the complement (the tail). The complete basis is the Householder matrix
``H = I − W T Wᵀ`` of ``V``'s QR (compact WY; ``H[:, :k] = ±V``, its other ``n − k`` columns an
orthonormal complement), never formed: ``Hᵀ X`` and ``H X`` cost O(n·k) per column of ``X``
(:class:`Householder`). EKFAC runs unchanged in that complete basis: ``m`` is ``d_out × d_in``,
one entry per direction, starting from the tail's value on the complement's directions, so
every direction of the tail is normalised by its own running second moment, as it was when
the complement was stored densely.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

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
    _sides: tuple[Side, Side] | None = field(default=None, repr=False, compare=False)

    def sides(self) -> tuple[Side, Side]:
        """The complete bases of ``A`` and ``B`` as operators (built once per basis)."""
        if self._sides is None:
            self._sides = (side(self.UA), side(self.UB))
        return self._sides

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
        m = torch.outer(complete_values(lam_b, UB), complete_values(lam_a, UA)) * f.locations
        return cls(UA, UB, m, lam_a, lam_b)


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
    """``U_Bᵀ G U_A``: a layer matrix in the Kronecker eigenbasis (complete bases of thin ones)."""
    if eig.thin:
        A, B = eig.sides()
        return B.t_left(A.right(G))
    return eig.UB.t() @ G @ eig.UA


def solve_in_eigenbasis(G1: Tensor, eig: Eigenbasis, denom: Tensor) -> Tensor:
    """``U_B (G' / denom) U_Aᵀ``: eq. 14's ``B̄⁻¹ G Ā⁻ᵀ`` with the damped eigenvalues ``denom``."""
    if eig.thin:
        A, B = eig.sides()
        return B.left(A.t_right(G1 / denom))
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
    def damped(m: Tensor, eps: float, weight_decay: float, damping: Damping) -> Tensor:
        """The denominator of eq. 14 in the eigenbasis: ``m + eps + γ`` (:attr:`Damping.FIXED`,
        Tikhonov, §3.2) or ``m + eps·mean(m) + γ`` (:attr:`Damping.RELATIVE`: ``eps`` is a
        fraction of the layer's mean second moment, whatever the scale of its gradients).

        A layer with ``m = 0`` (no gradient yet, e.g. zero-initialised gates) has ``G' = 0``
        (``m ≥ (1 − α)·batch·G'²``); its relative denominator is floored at the dtype's
        smallest normal number so that its step is ``0``, not ``0/0``."""
        if damping is Damping.RELATIVE:
            return (m + (eps * m.mean() + weight_decay)).clamp_min(torch.finfo(m.dtype).tiny)
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
        G1 = project(G, eig)
        m = eig.m * alpha + (1.0 - alpha) * batch * G1.square()
        if weight_decay:
            G1 = G1 + weight_decay * project(self.adapter.param_matrix(), eig)
        denom = self.damped(m, eps, weight_decay, damping)
        return Step(solve_in_eigenbasis(G1, eig, denom), m, G)

    def commit(self, step: Step) -> None:
        """Write the (possibly rescaled) ``step.P`` into ``.grad`` and keep ``step.m``."""
        self.adapter.set_grad_matrix(step.P)
        self.eigen.m = step.m


def complete_values(lam: Tensor, U: Tensor) -> Tensor:
    """One eigenvalue per direction of the complete basis: a thin side's ``k`` values, then
    its tail value once per complement direction."""
    n, k = U.shape
    return lam if k == n else torch.cat([lam[:k], lam[k:].expand(n - k)])


class Side:
    """One side's complete eigenbasis ``U`` as an operator on layer matrices:
    :meth:`t_left` = ``Uᵀ X``, :meth:`left` = ``U X``, :meth:`right` = ``X U``,
    :meth:`t_right` = ``X Uᵀ``."""

    def __init__(self, U: Tensor) -> None:
        self.U = U

    def t_left(self, X: Tensor) -> Tensor:
        return self.U.t() @ X

    def left(self, X: Tensor) -> Tensor:
        return self.U @ X

    def right(self, X: Tensor) -> Tensor:
        return X @ self.U

    def t_right(self, X: Tensor) -> Tensor:
        return X @ self.U.t()


class Householder(Side):
    """The complete basis ``H = I − W T Wᵀ`` of a thin ``V`` (``n × k``, orthonormal columns):
    the compact WY form of ``V``'s Householder QR (``T`` as LAPACK's ``larft`` defines it), so
    ``H[:, :k] = V·diag(±1)`` and ``H[:, k:]`` is an orthonormal complement; O(n·k) per column."""

    def __init__(self, V: Tensor) -> None:
        super().__init__(V)
        k = V.shape[1]
        a, tau = torch.geqrf(V)
        W = a.tril(-1)
        W.diagonal().fill_(1.0)
        # larft's T, solved at once: T⁻¹ = diag(1/τ) + striu(WᵀW) (Joffrain et al. 2006) over
        # the reflectors with τ ≠ 0; a τ = 0 reflector is the identity (zero row and column)
        live = (tau != 0).nonzero().squeeze(1)
        Wl = W[:, live]
        inv = (Wl.t() @ Wl).triu(1) + torch.diag(1.0 / tau[live])
        eye = torch.eye(live.numel(), dtype=V.dtype, device=V.device)
        T = torch.zeros(k, k, dtype=V.dtype, device=V.device)
        T[live[:, None], live[None, :]] = torch.linalg.solve_triangular(inv, eye, upper=True)
        self.W, self.T = W, T

    def t_left(self, X: Tensor) -> Tensor:  # Hᵀ X = X − W Tᵀ Wᵀ X
        return X - self.W @ (self.T.t() @ (self.W.t() @ X))

    def left(self, X: Tensor) -> Tensor:
        return X - self.W @ (self.T @ (self.W.t() @ X))

    def right(self, X: Tensor) -> Tensor:  # X H = X − X W T Wᵀ
        return X - ((X @ self.W) @ self.T) @ self.W.t()

    def t_right(self, X: Tensor) -> Tensor:
        return X - ((X @ self.W) @ self.T.t()) @ self.W.t()


def side(U: Tensor) -> Side:
    """The operator of a complete (``n × n``) or thin (``n × k``) basis."""
    return Householder(U) if is_thin(U) else Side(U)
