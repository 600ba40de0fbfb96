"""Kinetic and Jacobian-norm regularizer of a trained Neural ODE (the paper's Table 6).

Finlay et al. (2020), "How to train your neural ODE: the world of Jacobian and kinetic
regularization", penalize

    R = ∫_{t0}^{t1} ‖F(t, x(t))‖² dt + ∫_{t0}^{t1} ‖∇ₓF(t, x(t))‖²_F dt,

and the SNOpt paper (Table 6, "implicit regularization") reports both terms, averaged over the
batch, for models trained with different optimizers, next to the forward NFE.
:func:`kinetic_jacobian` measures them after training; it is a diagnostic, never differentiated.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchdyn.core import NeuralODE
from torchdyn.numerics.odeint import odeint

from torchdyn_snopt.adjoint import existing_record, forget

__all__ = ["kinetic_jacobian"]


def _check_count(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= {minimum}")


def _resolve_t_span(node: NeuralODE, t_span: Tensor | Sequence[float] | None, x0: Tensor) -> Tensor:
    if t_span is None:
        t_span = getattr(node, "t_span", None)
    if t_span is None:
        t_span = (0.0, 1.0)
    dtype = x0.dtype if x0.is_floating_point() else torch.get_default_dtype()
    ts = torch.as_tensor(t_span, dtype=dtype, device=x0.device).detach()
    if ts.dim() != 1 or ts.numel() < 2 or not bool(torch.isfinite(ts).all()):
        raise ValueError(
            f"t_span={t_span!r} is invalid; accepted: None or a 1-D sequence/tensor of at "
            "least 2 finite times"
        )
    return ts


def _per_sample_sq(v: Tensor) -> Tensor:
    """Squared Euclidean norm over all non-batch dimensions, one value per sample."""
    return v.reshape(v.shape[0], -1).pow(2).sum(1)


def _jacobian_sq(
    node: NeuralODE,
    t: Tensor,
    x: Tensor,
    hutchinson_samples: int,
    generator: torch.Generator | None,
    exact: bool,
) -> tuple[Tensor, Tensor]:
    """Per-sample ``‖F‖²`` and ``‖∇ₓF‖²_F`` at one time ``t`` and state ``x`` (B, ...).

    Every VJP covers the whole batch at once: with independent samples, ``∂(Σ_b vᵦᵀFᵦ)/∂xᵦ``
    is ``vᵦᵀ ∂Fᵦ/∂xᵦ``. Layers that mix samples (e.g. BatchNorm in training mode) break this.
    """
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        f = node.vf(t, x_)
        if f.shape != x_.shape:
            raise ValueError(
                f"the vector field returned shape {tuple(f.shape)} for a state of shape "
                f"{tuple(x_.shape)}; kinetic_jacobian needs F(t, x) shaped like x"
            )
        kinetic = _per_sample_sq(f.detach())
        jac = torch.zeros_like(kinetic)
        if exact:
            flat = f.reshape(f.shape[0], -1)
            n_out = flat.shape[1]
            for j in range(n_out):  # row j of every sample's Jacobian
                onehot = torch.zeros_like(flat)
                onehot[:, j] = 1.0
                (row,) = torch.autograd.grad(
                    flat, x_, grad_outputs=onehot, retain_graph=j < n_out - 1
                )
                jac += _per_sample_sq(row)
        else:  # Hutchinson: ‖J‖²_F = E_ε ‖εᵀJ‖², ε ~ N(0, I)
            for k in range(hutchinson_samples):
                eps = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
                (vjp,) = torch.autograd.grad(
                    f, x_, grad_outputs=eps, retain_graph=k < hutchinson_samples - 1
                )
                jac += _per_sample_sq(vjp)
            jac /= hutchinson_samples
    return kinetic, jac


def kinetic_jacobian(
    node: NeuralODE,
    x0: Tensor,
    t_span: Tensor | Sequence[float] | None = None,
    n_points: int = 33,
    hutchinson_samples: int = 1,
    generator: torch.Generator | None = None,
    exact: bool = False,
) -> dict[str, float]:
    """Kinetic + Jacobian-norm regularizer of Finlay et al. (2020), as in the paper's Table 6.

    Solves the ODE from ``x0`` (shape ``(B, ...)``) with the model's solver and tolerances
    (``torchdyn.numerics.odeint(node.vf, ...)``) on a uniform grid of ``n_points`` times over
    ``[t_span[0], t_span[-1]]``; at each grid point takes per-sample ``‖F‖²`` and
    ``‖∇ₓF‖²_F`` (norms over all non-batch dimensions) and integrates them over time with the
    trapezoid rule over ``|t1 - t0|`` (both terms stay non-negative for a reversed span).

    The Frobenius norm is Hutchinson's estimate ``mean_k ‖ε_kᵀ ∇ₓF‖²``, ``ε_k ~ N(0, I)``,
    with ``hutchinson_samples`` draws from ``generator`` (one batched VJP per draw), or exact
    with ``exact=True`` (one VJP per state coordinate: meant for small states). Samples must
    not interact inside the vector field.

    Args:
        node: a torchdyn ``NeuralODE`` (any sensitivity).
        x0: initial states, batch first.
        t_span: integration interval; defaults to ``node.t_span`` if set, else ``[0, 1]``.
        n_points: grid points, an int >= 2. Fixed-step solvers take one step per grid interval.
        hutchinson_samples: probe vectors per grid point, an int >= 1 (unused when exact).
        generator: RNG for the probes (on ``x0``'s device); the global RNG if None.
        exact: compute the exact Frobenius norm instead of Hutchinson's estimate.

    Returns:
        ``{"kinetic", "jacobian", "total", "nfe_forward"}``: both integrals averaged over the
        batch, their sum, and the vector-field evaluations of one ordinary forward solve
        ``node(x0, t_span)``.

    The model is left as found: parameters, their ``.grad``, buffers (e.g. BatchNorm running
    statistics), ``node.vf.nfe`` and the SNOpt curvature sampler's counters are unchanged.
    """
    _check_count("n_points", n_points, 2)
    _check_count("hutchinson_samples", hutchinson_samples, 1)
    if not isinstance(x0, Tensor) or x0.dim() < 1 or x0.shape[0] < 1:
        raise ValueError("x0 is invalid; accepted: a tensor of shape (B, ...) with B >= 1")
    ts = _resolve_t_span(node, t_span, x0)
    x0 = x0.detach()
    t0, t1 = float(ts[0]), float(ts[-1])
    grid = torch.linspace(t0, t1, n_points, dtype=ts.dtype, device=ts.device)

    vf = node.vf
    nfe_before = vf.nfe
    record = existing_record(node)
    record_nfe = None if record is None else vars(record.nfe).copy()
    buffers = [(b, b.detach().clone()) for b in node.buffers()]
    try:
        with torch.no_grad():
            # One ordinary forward solve for the NFE; it also runs torchdyn's per-call
            # preparation (e.g. DataControl's control input) that the evaluations below rely on.
            start = vf.nfe
            node(x0, ts)
            nfe_forward = float(vf.nfe - start)

            with warnings.catch_warnings():  # fixed-step solvers warn about unused tolerances
                warnings.filterwarnings("ignore", message="Setting tolerances has no effect")
                _, traj = odeint(vf, x0, grid, node.solver, atol=node.atol, rtol=node.rtol)

            kin_t = []
            jac_t = []
            for i in range(n_points):
                k, j = _jacobian_sq(node, grid[i], traj[i], hutchinson_samples, generator, exact)
                kin_t.append(k)
                jac_t.append(j)

            h = abs(t1 - t0) / (n_points - 1)
            weights = torch.full((n_points, 1), h, dtype=grid.dtype, device=grid.device)
            weights[0] = weights[-1] = h / 2
            kinetic = float((torch.stack(kin_t) * weights).sum(0).mean())
            jacobian = float((torch.stack(jac_t) * weights).sum(0).mean())
    finally:
        vf.nfe = nfe_before
        if record is None:
            forget(node)
        elif record_nfe is not None:
            for key, value in record_nfe.items():
                setattr(record.nfe, key, value)
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return {
        "kinetic": kinetic,
        "jacobian": jacobian,
        "total": kinetic + jacobian,
        "nfe_forward": nfe_forward,
    }
