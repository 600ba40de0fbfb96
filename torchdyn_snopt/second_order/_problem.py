"""What every second-order routine reads from a torchdyn ``NeuralODE``, checked once.

θ is the trainable parameters of ``node.vf`` in ``vf.parameters()`` order, flattened and
concatenated (``n`` entries). The state ``x`` has ``M = x0.numel()`` entries (batch included).
Forward solves use ``node.solver``/``atol``/``rtol``; backward solves ``node.solver_adjoint``/
``atol_adjoint``/``rtol_adjoint``, both through :func:`torchdyn_snopt.integrate.integrate`,
one call per interval of ``t_span`` (fixed-step solvers take one step per interval, as in
torchdyn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core.problems import ODEProblem

from torchdyn_snopt.integrate import integrate

LossFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Problem:
    """A checked NeuralODE setup: field, θ, time grid, solvers and tolerances."""

    vf: nn.Module
    params: tuple[Tensor, ...]
    names: tuple[str, ...]
    t_span: Tensor
    solver: nn.Module
    solver_adjoint: nn.Module
    atol: float
    rtol: float
    atol_adjoint: float
    rtol_adjoint: float
    seminorm: bool = False  #: the node's backward semi-norm (Kidger et al. 2020a)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.params]


def problem_of(node: ODEProblem, x0: Tensor, t_span: Tensor | None, fn: str) -> Problem:
    """Validate ``node``, ``x0`` and ``t_span`` for the public function named ``fn``."""
    if not isinstance(node, ODEProblem):
        raise TypeError(
            f"{fn}: node={type(node).__name__} is not supported; accepted: a torchdyn "
            "NeuralODE or ODEProblem"
        )
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError(f"{fn}: x0={x0!r:.60} is invalid; accepted: a floating-point Tensor")
    if getattr(node, "integral_loss", None) is not None:
        raise ValueError(
            f"{fn}: node.integral_loss={node.integral_loss!r} is not supported; accepted: None "
            "(put the running cost into loss_fn over a t_span grid instead)"
        )
    if t_span is None:
        t_span = getattr(node, "t_span", None)
    if t_span is None:
        t_span = torch.tensor([0.0, 1.0])
    t_span = torch.as_tensor(t_span).to(device=x0.device, dtype=x0.dtype)
    if t_span.dim() != 1 or len(t_span) < 2 or not bool((t_span[1:] > t_span[:-1]).all()):
        raise ValueError(
            f"{fn}: t_span={t_span.tolist()} is invalid; accepted: a 1-D tensor of at least "
            "2 strictly increasing times"
        )
    named = [(n, p) for n, p in node.vf.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{fn}: node.vf has no trainable parameters; nothing to differentiate")
    bad = [n for n, p in named if p.dtype != x0.dtype or p.device != x0.device]
    if bad:
        raise ValueError(
            f"{fn}: x0.dtype={x0.dtype} / device {x0.device} differs from node.vf's parameter "
            f"{bad[0]!r}; accepted: x0 and θ on one dtype and device"
        )
    if hasattr(node, "_prep_integration"):  # DataControl fields read x0 from here
        node._prep_integration(x0, t_span)
    return Problem(
        vf=node.vf,
        params=tuple(p for _, p in named),
        names=tuple(n for n, _ in named),
        t_span=t_span,
        solver=node.solver,
        solver_adjoint=node.solver_adjoint,
        atol=float(node.atol),
        rtol=float(node.rtol),
        atol_adjoint=float(node.atol_adjoint),
        rtol_adjoint=float(node.rtol_adjoint),
        seminorm=bool(getattr(node, "seminorm", False)),
    )


def forward_solve(problem: Problem, x0: Tensor) -> Tensor:
    """States at every ``t_span`` point, shape ``(T, *x0.shape)``, without a graph."""
    vf, shape = problem.vf, x0.shape

    def f(t: Tensor, y: Tensor) -> Tensor:
        return vf(t, y.reshape(shape)).reshape(-1)

    out = [x0.detach()]
    y = x0.detach().reshape(-1)
    with torch.no_grad():
        for t_lo, t_hi in zip(problem.t_span[:-1], problem.t_span[1:]):
            y = integrate(f, y, t_lo, t_hi, problem.solver, problem.atol, problem.rtol)
            out.append(y.reshape(shape))
    return torch.stack(out)


def backward_solve(
    problem: Problem,
    dynamics: Callable[[Tensor, Tensor], Tensor],
    y: Tensor,
    k: int,
    seminorm_dim: int | None = None,
) -> Tensor:
    """Integrate ``dy/ds = dynamics(t, y)`` in ``s = -t`` from ``t_span[k]`` to ``t_span[k-1]``.

    ``dynamics`` receives the true time ``t`` and returns ``dy/ds`` (i.e. ``-dy/dt``). With
    ``seminorm_dim`` the step-size control measures only ``y[:seminorm_dim]``.
    """
    t_span = problem.t_span
    return integrate(
        lambda s, y_: dynamics(-s, y_),
        y,
        -t_span[k],
        -t_span[k - 1],
        problem.solver_adjoint,
        problem.atol_adjoint,
        problem.rtol_adjoint,
        seminorm_dim,
    )


def scalar_loss(loss_fn: LossFn, sol: Tensor, fn: str) -> Tensor:
    """``loss_fn(sol)`` as a 0-d tensor; ValueError naming ``fn`` if it is not a scalar."""
    loss = loss_fn(sol)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            f"{fn}: loss_fn returned {loss!r:.60}; accepted: a scalar Tensor "
            "(loss_fn gets the trajectory, shape (len(t_span), *x0.shape))"
        )
    return loss.reshape(())


def loss_derivatives(loss_fn: LossFn, sol: Tensor, fn: str) -> tuple[Tensor, Tensor]:
    """Value and gradient of ``loss_fn(sol)`` w.r.t. the trajectory ``sol`` (shape of ``sol``)."""
    with torch.enable_grad():
        s = sol.detach().requires_grad_(True)
        loss = scalar_loss(loss_fn, s, fn)
        (g,) = torch.autograd.grad(loss, s, allow_unused=True)
    return loss.detach().reshape(()), torch.zeros_like(sol) if g is None else g


def flat_to_params(vec: Tensor, params: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Split a flat vector into tensors shaped like ``params``."""
    parts = vec.split([p.numel() for p in params])
    return tuple(v.reshape(p.shape) for v, p in zip(parts, params))


def grads_or_zeros(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    """``torch.autograd.grad(..., allow_unused=True)`` results with ``None`` as zeros, flat."""
    return [
        torch.zeros(t.numel(), dtype=t.dtype, device=t.device) if g is None else g.reshape(-1)
        for g, t in zip(grads, like)
    ]
