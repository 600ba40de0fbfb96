"""Eigenbasis of one Kronecker factor at a curvature refresh: exact, or warm-started and cheap.

EKFAC (George et al. 2018; the paper's Alg. 2) needs ``F = U diag(λ) Uᵀ`` of every factor
``F`` (``Ā`` or ``B̄``, ``n × n``, symmetric PSD) at each refresh. :attr:`Refresh.EXACT` runs
``torch.linalg.eigh``: O(n³) with a large constant (one thread, float32: 1.4 s at n = 2048).

:attr:`Refresh.POWER` is for wide layers, where ``eigh`` dominates a refresh:

- ``n <= max(rank, exact_up_to)`` (:data:`EXACT_UP_TO` = 512): ``eigh`` as under
  :attr:`Refresh.EXACT`. Up to 256 it costs no more than a top-128 subspace step, at 512 about
  12 ms more per factor and refresh (about 1 ms per step at the default refresh interval),
  while approximate bases at these widths cost training quality: with one warm-started step on
  factors up to 128 wide (SOAP's refresh) and thin bases above, the suite's MNIST runs ended
  at training loss 0.054-0.063 against 0.045-0.050 with ``eigh`` (seeds 0-2, equal
  iterations).
- wider, when the factor is numerically low-rank (its previous eigenvalues leave at most
  :data:`TAIL_SHARE` of the trace outside the top ``rank``, :func:`warm`; a 32 → 2048 → 32 MLP
  field's two 2048-wide factors keep 97.6 % and 99.3 % in their top 128): the top-``rank``
  subspace only, started from the layer's previous eigenbasis ``(λ₀, U₀)``, which is close to
  the new one when the factors drift slowly (cost O(n² rank)):
  ``V ← qr(F V₀)`` from ``U₀``'s ``rank`` leading columns, Rayleigh-Ritz on ``Vᵀ F V``, and
  the rest of the spectrum one isotropic *tail*: the complement of ``V`` shares the mean
  eigenvalue ``(tr F − Σ μ) / (n − rank)``. The result is *thin* (:func:`is_thin`): ``U = V``
  is ``n × rank`` and ``λ`` has ``rank + 1`` entries, the last one the tail's. No complement
  basis is ever formed: :mod:`torchdyn_snopt.layer_state` applies the complete basis as the
  Householder operator of ``V`` in O(n·rank) per side, and EKFAC's running second moment then
  adapts every direction of the tail from the gradients themselves.
- wider with a heavy tail (a 64-channel conv field on digits leaves 6 % and 13 % of its
  input factors' trace outside the top 128), and at a first refresh: ``eigh``,
  kept complete unless its own spectrum shows a light tail (:func:`settle` then truncates it).
  One isotropic value for a heavy tail trains badly (see :data:`TAIL_SHARE`), so these
  factors pay ``eigh``'s cost; whether a refresh is thin is decided by the previous basis
  alone, so every rank of a distributed job knows each result's shape in advance
  (:func:`pair_shape`). Convolutions never get thin bases (the preconditioner asks for
  :attr:`Refresh.EXACT` for them: :attr:`~torchdyn_snopt.curvature.base.LayerAdapter.thin_bases`).

Sketched factors (:func:`from_sketch`): a thin side's next refresh needs only ``F Ω`` for the
current basis ``Ω = V₀`` and ``tr F``, so the backward solve samples the sketch
``[F Ω, diag F]`` (O(rows·n·rank) per node instead of O(rows·n²);
:func:`~torchdyn_snopt.curvature.base.sketch_moment`) and the refresh is the Nyström
approximation ``F Ω (Ωᵀ F Ω)⁺ Ωᵀ F`` (single pass, Tropp et al. 2017): its range is
``span(F Ω)``, the subspace one step of subspace iteration reaches, its eigenpairs come in
O(n·rank²), and the tail is again ``(tr F − Σ λ) / (n − rank)``.

Sketches are taken only of thin sides that stay warm (:func:`sketchable`); a thin side whose
tail has grown is sampled completely for the ``eigh`` of its next refresh.

Every result keeps the factor's device and dtype; ``λ[i]`` belongs to ``U[:, i]`` (the order
is not sorted).
"""

from __future__ import annotations

import enum
import math

import torch
from torch import Tensor

#: ``(eigenvalues (n,), eigenvectors (n, n))`` of one factor, column ``i`` for value ``i``.
Eigenpairs = tuple[Tensor, Tensor]

#: Subspace-iteration steps per :attr:`Refresh.POWER` refresh (SOAP uses one).
POWER_STEPS = 1
#: Leading eigenpairs :attr:`Refresh.POWER` tracks in a wide factor; a tail value for the rest.
POWER_RANK = 128
#: Widest factor :attr:`Refresh.POWER` still decomposes exactly; wider factors get thin bases.
#: One core, float32: ``eigh`` 0.8 ms at 128, 3.2 ms at 256 against 2.2 ms for a top-128
#: subspace step, then 16 ms against 3.6 ms at 512 and 106 ms against 8 ms at 1024.
EXACT_UP_TO = 512
#: Largest share of a wide factor's trace that a thin basis may leave to its isotropic tail.
#: Above it the factor gets ``eigh``'s complete basis: a 64-channel conv field on digits (input
#: factors 577 wide, 6 % and 13 % of the trace outside the top 128) trained to 0.10 / 0.47
#: (seeds 0, 1; rank 256: 0.73 / 0.20; exact top 128 plus the tail: 3.3 on seed 1) against
#: ``eigh``'s 0.052 / 0.021 after 30 iterations, while a 32 → 2048 → 32 MLP field's factors
#: keep 97.6 % and 99.3 % in their top 128.
TAIL_SHARE = 0.05


class Refresh(str, enum.Enum):
    """How a curvature refresh obtains each factor's eigenbasis (a string works too)."""

    EXACT = "exact"
    POWER = "power"


def parse_refresh(value: Refresh | str) -> Refresh:
    """``value`` as a :class:`Refresh`; ``ValueError`` naming it and the accepted values."""
    try:
        return Refresh(value)
    except ValueError:
        accepted = ", ".join(repr(r.value) for r in Refresh)
        raise ValueError(f"refresh={value!r} is invalid; accepted: {accepted}") from None


def eigh_exact(matrix: Tensor) -> Eigenpairs:
    """Eigen-decomposition of a symmetric PSD factor, eigenvalues clamped at 0 (ascending).

    Runs in the factor's dtype (float32 halves the cost of the large head factors) and
    falls back to float64 when LAPACK does not converge.
    """
    sym = (matrix + matrix.t()) / 2
    try:
        evals, evecs = torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        evals, evecs = torch.linalg.eigh(sym.double())
    return evals.clamp(min=0).to(matrix.dtype), evecs.to(matrix.dtype)


def eigh_from_rows(rows: Tensor) -> Eigenpairs:
    """Eigen-decomposition of ``A = RᵀR`` from its ``r < d`` rows ``R`` (``r × d``).

    A complete QR ``Rᵀ = Q [S; 0]`` gives ``A = Q diag(S Sᵀ, 0) Qᵀ``, so ``Q``'s first ``r``
    columns rotated by the eigenvectors of the small ``S Sᵀ`` and its other ``d − r`` columns
    (eigenvalue 0) are a complete orthonormal eigenbasis: O(d² r) instead of eigh's O(d³)
    (785-wide head, batch 128: 5.5 ms vs 37 ms on one core). Already cheaper than a
    :attr:`Refresh.POWER` step, so it is used whatever the refresh.
    """
    r = rows.shape[0]
    Q, S = torch.linalg.qr(rows.t(), mode="complete")
    S = S[:r]
    lam, W = eigh_exact(S @ S.t())
    return torch.cat([lam, lam.new_zeros(Q.shape[0] - r)]), torch.cat([Q[:, :r] @ W, Q[:, r:]], 1)


def refresh_eigh(
    matrix: Tensor,
    prior: Eigenpairs | None,
    refresh: Refresh = Refresh.EXACT,
    *,
    steps: int = POWER_STEPS,
    rank: int = POWER_RANK,
    exact_up_to: int = EXACT_UP_TO,
    settled: bool = True,
) -> Eigenpairs:
    """Eigenpairs of ``matrix`` (``n × n``): ``eigh``, or under :attr:`Refresh.POWER` for
    ``n > max(rank, exact_up_to)`` the thin top-``rank`` pairs and the tail, warm-started from
    ``prior`` when :func:`warm` allows it (see module). Otherwise ``eigh``, made thin by
    :func:`settle` when its top ``rank`` directions hold the trace (``settled=False``: left
    complete, as :func:`pair_shape` predicts; the caller settles later)."""
    n = matrix.shape[0]
    if not is_wide(n, refresh, rank, exact_up_to):
        return eigh_exact(matrix)
    if prior is None or not warm(prior, n, rank):
        pairs = eigh_exact(matrix)
        return settle(pairs, refresh, rank=rank, exact_up_to=exact_up_to) if settled else pairs
    lam0, U0 = (t.to(device=matrix.device, dtype=matrix.dtype) for t in prior)
    return top_subspace((matrix + matrix.t()) / 2, lam0, U0, rank, steps)


def tail_share(pair: Eigenpairs, rank: int = POWER_RANK) -> float:
    """Share of the factor's trace outside its top ``rank`` directions: for complete pairs
    ``1 − (top rank values) / Σλ``; for thin pairs (``k`` columns) the tail value's share,
    ``λ_tail (n − k) / (Σ μ + λ_tail (n − k))`` (0 for a zero factor)."""
    lam, U = pair
    n, k = U.shape
    if k == n:
        total = lam.sum()
        top = torch.topk(lam, min(rank, n)).values.sum()
    else:
        top = lam[:k].sum()
        total = top + lam[k] * (n - k)
    return float(1.0 - top / total) if float(total) > 0 else 0.0


def warm(prior: Eigenpairs, n: int, rank: int = POWER_RANK) -> bool:
    """Whether a wide factor's refresh may start from ``prior`` and stay thin: the prior fits
    (``n`` rows, at least ``rank`` columns) and its tail holds at most :data:`TAIL_SHARE` of
    the trace. A heavier tail means the factor is not numerically low-rank, where one
    isotropic tail value trains badly, so that factor gets ``eigh`` instead."""
    U = prior[1]
    return U.shape[0] == n and U.shape[1] >= rank and tail_share(prior, rank) <= TAIL_SHARE


def settle(
    pairs: Eigenpairs,
    refresh: Refresh,
    *,
    rank: int = POWER_RANK,
    exact_up_to: int = EXACT_UP_TO,
) -> Eigenpairs:
    """A wide factor's complete pairs (from ``eigh``) cut to thin ones (:func:`truncate`)
    when their top ``rank`` directions hold all but :data:`TAIL_SHARE` of the trace;
    anything else unchanged. Deterministic, so ranks holding the same pairs settle alike."""
    lam, U = pairs
    n = U.shape[0]
    if is_thin(U) or not is_wide(n, refresh, rank, exact_up_to):
        return pairs
    return truncate(lam, U, rank) if tail_share(pairs, rank) <= TAIL_SHARE else pairs


def is_wide(
    n: int, refresh: Refresh, rank: int = POWER_RANK, exact_up_to: int = EXACT_UP_TO
) -> bool:
    """Whether an ``n × n`` factor may get thin eigenpairs under ``refresh``."""
    return refresh is Refresh.POWER and n > max(rank, exact_up_to)


def is_thin(U: Tensor) -> bool:
    """Whether a basis ``U`` (``n × k``) is thin (``k < n``): its eigenvalues then have
    ``k + 1`` entries, the last one shared by the ``n − k`` directions orthogonal to ``U``."""
    return U.shape[1] < U.shape[0]


def sketchable(pair: Eigenpairs | None, rank: int = POWER_RANK) -> bool:
    """Whether a side's next refresh may come from a sketch of its factor: its current basis
    is thin and :func:`warm` (otherwise the source samples the complete factor for ``eigh``)."""
    return pair is not None and is_thin(pair[1]) and warm(pair, pair[1].shape[0], rank)


def pair_shape(
    n: int,
    refresh: Refresh,
    prior: Eigenpairs | None = None,
    rank: int = POWER_RANK,
    exact_up_to: int = EXACT_UP_TO,
) -> tuple[int, int]:
    """``(len(λ), columns of U)`` of ``refresh_eigh(F, prior, refresh, settled=False)`` for an
    ``n × n`` factor ``F``: thin only when warm-started from ``prior`` (see :func:`warm`)."""
    thin = is_wide(n, refresh, rank, exact_up_to) and prior is not None and warm(prior, n, rank)
    return (rank + 1, rank) if thin else (n, n)


def truncate(lam: Tensor, U: Tensor, rank: int) -> Eigenpairs:
    """Thin eigenpairs from complete ones: the ``rank`` largest pairs and the tail's mean."""
    top = torch.topk(lam, rank).indices
    mu = lam[top]
    tail = ((lam.sum() - mu.sum()) / (lam.shape[0] - rank)).clamp(min=0)
    return torch.cat([mu, tail[None]]), U[:, top]


def _signed_qr(Y: Tensor) -> Tensor:
    """``Q`` of ``Y = QR`` with ``diag(R) >= 0`` (column ``i`` of ``Q`` leans towards ``Y``'s)."""
    Q, R = torch.linalg.qr(Y)
    sign = torch.where(R.diagonal() < 0, -1.0, 1.0).to(Q.dtype)
    return Q * sign


def top_subspace(F: Tensor, lam0: Tensor, U0: Tensor, rank: int, steps: int) -> Eigenpairs:
    """Thin eigenpairs of ``F``: the top-``rank`` Ritz pairs by subspace iteration from ``U0``'s
    leading columns (by ``lam0``; ``U0`` thin or complete) and, last, the tail's mean
    eigenvalue ``(tr F − Σ Ritz values) / (n − rank)``."""
    n = F.shape[0]
    V = U0[:, torch.topk(lam0[: U0.shape[1]], rank).indices]
    for _ in range(steps):
        V = _signed_qr(F @ V)
    mu, W = eigh_exact(V.t() @ (F @ V))  # Rayleigh-Ritz in span(V)
    tail = ((F.diagonal().sum() - mu.sum()) / (n - rank)).clamp(min=0)
    return torch.cat([mu, tail[None]]), V @ W


def from_sketch(sketch: Tensor, probe: Tensor) -> Eigenpairs:
    """Thin eigenpairs from a factor's sketch ``[F Ω, diag F]`` (``n × (k + 1)``) and its probe
    ``Ω`` (``n × k``, orthonormal): the Nyström approximation's ``k`` eigenpairs and the tail's
    mean ``(tr F − Σ λ) / (n − k)``, as :func:`top_subspace` lays them out.

    Stabilised as in Tropp et al. 2017 (Alg. 3): ``Y_ν = F Ω + ν Ω`` with a shift ``ν`` at
    rounding level (``ε·sqrt(n)·‖F Ω‖_F``, the Frobenius norm: no SVD),
    ``Ωᵀ Y_ν = Z diag(w) Zᵀ``, ``B = Y_ν Z diag(w)^{-1/2}`` (directions with ``w`` at rounding
    level dropped, then padded back with zero-valued directions), ``B = U Σ …`` (thin SVD),
    ``λ = max(Σ² − ν, 0)``.
    """
    n, k = probe.shape
    Y, diag = sketch[:, :k], sketch[:, k]
    nu = torch.finfo(Y.dtype).eps * math.sqrt(n) * torch.linalg.matrix_norm(Y)  # ‖Y‖_F ≥ ‖Y‖₂
    Y = Y + nu * probe
    core = probe.t() @ Y
    w, Z = torch.linalg.eigh((core + core.t()) / 2)
    keep = w > torch.finfo(Y.dtype).eps * w.abs().max().clamp_min(torch.finfo(Y.dtype).tiny) * k
    B = (Y @ Z[:, keep]) / w[keep].sqrt()
    U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
    lam = (sigma.square() - nu).clamp(min=0)
    if U.shape[1] < k:  # rank-deficient: pad with any orthonormal directions of value 0
        extra = _signed_qr(torch.cat([U, probe], 1))[:, U.shape[1] : k]
        U, lam = torch.cat([U, extra], 1), torch.cat([lam, lam.new_zeros(k - lam.shape[0])])
    tail = ((diag.sum() - lam.sum()) / (n - k)).clamp(min=0)
    return torch.cat([lam, tail[None]]), U
