"""The ``"snopt"`` sensitivity: forward solve, then one backward augmented-adjoint solve.

Augmented state of the backward solve (one flat vector, integrated in reversed time
``s = -t`` with the problem's ``solver_adjoint``)::

    y = [ x (numel x) | a (numel x) | μ (numel θ) ]

    dx/dt = F(t, x),  da/dt = -aᵀ ∂F/∂x - ∂ℓ/∂x,  dμ/dt = -aᵀ ∂F/∂θ        (eq. 3-5, 9a)

started at the last output time with ``a = ∂L/∂x`` and ``μ = 0``; at every earlier output time
``a`` jumps by that output's gradient. ``μ(t0) = ∂L/∂θ`` and ``a(t0) = ∂L/∂x0``. The rank-1
Gauss-Newton curvature vector ``q = a / sqrt(t1 - t0)`` (eq. 11, §3.2) is proportional to
``a`` and needs no state of its own. With ``seminorm=True`` the step-size control measures
only ``[x, a]`` (Kidger et al. 2020a).

Curvature: an optimizer that wants the layers of a problem sampled binds a
:class:`~torchdyn_snopt.curvature.source.CurvatureRequest` to it (:func:`bind_request`). The
forward pass looks the request up once and hands it to the backward pass as an argument;
when it is armed, the accepted backward steps feed a
:class:`~torchdyn_snopt.curvature.sampler.SolveSampling`, which returns the factors through
``request.factors``. The forward pass reports its batch size through ``request.batch_size``.

Ownership: this module keeps, per problem, a :class:`ProblemRecord` (evaluation counters, the
Gauss-Newton horizon a model may set, the bound request) in a registry keyed by a weak
reference to the problem; nothing is stored on the problem itself.
"""

from __future__ import annotations

import functools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core.problems import ODEProblem
from torchdyn.numerics.odeint import odeint

from torchdyn_snopt.cnf import noise_snapshot, pinned_noise
from torchdyn_snopt.curvature.sampler import NFE, SolveSampling
from torchdyn_snopt.curvature.source import CurvatureRequest
from torchdyn_snopt.integrate import integrate, with_fixed_rk4

_log = logging.getLogger(__name__)


@dataclass
class ProblemRecord:
    """What the snopt sensitivity keeps for one ODE problem.

    ``nfe``: vector-field evaluations by purpose (:func:`torchdyn_snopt.read_nfe`);
    ``horizon``: the Gauss-Newton normalisation ``T`` of ``q = a / sqrt(T)`` when one
    iteration runs many short solves (set by the model, :func:`set_horizon`; None = each
    solve's own span); ``request``: the curvature request an optimizer bound (or None).
    """

    nfe: NFE = field(default_factory=NFE)
    horizon: float | None = None
    request: CurvatureRequest | None = None


_RECORDS: weakref.WeakKeyDictionary[ODEProblem, ProblemRecord] = weakref.WeakKeyDictionary()


def record_of(problem: ODEProblem) -> ProblemRecord:
    """The :class:`ProblemRecord` of ``problem`` (created on first use)."""
    record = _RECORDS.get(problem)
    if record is None:
        record = _RECORDS[problem] = ProblemRecord()
    return record


def existing_record(problem: nn.Module) -> ProblemRecord | None:
    """The record of ``problem`` if one was created, else None (creates nothing)."""
    return _RECORDS.get(problem)


def forget(problem: nn.Module) -> None:
    """Drop the record of ``problem`` (counters, horizon, request), if any."""
    _RECORDS.pop(problem, None)


def bind_request(problem: ODEProblem, request: CurvatureRequest) -> None:
    """Sample ``problem``'s backward solves as ``request`` says (replaces an earlier one)."""
    record_of(problem).request = request


def set_horizon(problem: ODEProblem, horizon: float | None) -> None:
    """Gauss-Newton horizon ``T`` (time units of ``t_span``) of ``problem``'s next solves."""
    record_of(problem).horizon = horizon


class _CountingField(nn.Module):
    """Wraps the vector field to count forward-solve evaluations."""

    def __init__(self, vf: nn.Module, nfe: NFE) -> None:
        super().__init__()
        self.vf, self._nfe = vf, nfe

    def forward(self, t: Tensor, x: Tensor, args: dict | None = None) -> Tensor:
        self._nfe.forward += 1
        return self.vf(t, x)


def _can_resolve(problem: ODEProblem, sol: Tensor, t_span: Tensor, save_at: Any) -> bool:
    """Whether a short forward solve can be redone by :func:`_solve_by_intervals`."""
    increasing = bool((t_span[1:] > t_span[:-1]).all())
    plain = problem.interpolator is None and not len(save_at)
    return plain and increasing and bool(torch.isfinite(sol).all())


def _solve_by_intervals(
    vf: nn.Module, x: Tensor, t_span: Tensor, problem: ODEProblem, args: dict
) -> tuple[Tensor, Tensor]:
    """Forward solve between consecutive ``t_span`` points; outputs at every point."""
    sol = [x]
    for k in range(len(t_span) - 1):
        sol.append(
            integrate(
                vf,
                sol[-1],
                t_span[k],
                t_span[k + 1],
                problem.solver,
                problem.atol,
                problem.rtol,
                args=args,
            )
        )
    return t_span, torch.stack(sol)


class _SNOptAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        problem: ODEProblem,
        request: CurvatureRequest | None,
        x: Tensor,
        t_span: Tensor,
        save_at: Any,
        args: dict,
        *params: Tensor,
    ) -> tuple[Tensor, Tensor]:
        nfe = record_of(problem).nfe
        t_eval, sol = odeint(
            _CountingField(problem.vf, nfe),
            x,
            t_span,
            with_fixed_rk4(problem.solver),
            problem.atol,
            problem.rtol,
            interpolator=problem.interpolator,
            save_at=save_at,
            args=args,
        )
        expected = len(save_at) if len(save_at) else len(t_span)
        if len(t_eval) < expected and _can_resolve(problem, sol, t_span, save_at):
            # torchdyn's adaptive loop saves an output only when ``t + dt == t_span[i]`` holds
            # in floating point; for a last step ``dt = T - t`` that can fail by one ulp and
            # the solve ends without its outputs (frequent once t_span is learned, e.g. by
            # FreeHorizon). Redo it with our loop, which lands on every point exactly.
            _log.debug(
                "forward solve missed %d outputs; redone interval by interval",
                expected - len(t_eval),
            )
            t_eval, sol = _solve_by_intervals(
                _CountingField(problem.vf, nfe), x, t_span, problem, args
            )
        if len(t_eval) < expected:  # torchdyn's adaptive loop stops silently on NaN/underflow
            raise RuntimeError(
                f"the forward ODE solve returned {len(t_eval)} of {expected} requested outputs "
                f"(last time reached: {float(t_eval[-1]):.6g} of t_span ending at "
                f"{float(t_span[-1]):.6g}): its state became non-finite or the adaptive step "
                "size underflowed; lower the learning rate, or tighten/loosen atol and rtol"
            )
        ctx.problem, ctx.request, ctx.args, ctx.params = problem, request, args, params
        ctx.noise = noise_snapshot(problem.vf)  # a CNF's Hutchinson noise, held for backward
        ctx.save_for_backward(t_eval, sol, t_span, x)
        return t_eval, sol

    @staticmethod
    def backward(ctx: Any, grad_t_eval: Tensor, grad_sol: Tensor) -> tuple[Any, ...]:
        t_eval, sol, t_span, x0 = ctx.saved_tensors
        problem: ODEProblem = ctx.problem
        with pinned_noise(ctx.noise):
            grads = _backsolve(
                problem,
                ctx.request,
                ctx.params,
                t_eval,
                sol,
                t_span,
                x0,
                grad_sol,
                ctx.args,
                need_t=ctx.needs_input_grad[3],
            )
        a0, t_grad, param_grads = grads
        return (None, None, a0, t_grad, None, None, *param_grads)


def _backsolve(
    problem: ODEProblem,
    request: CurvatureRequest | None,
    params: tuple[Tensor, ...],
    t_eval: Tensor,
    sol: Tensor,
    t_span: Tensor,
    x0: Tensor,
    grad_sol: Tensor,
    args: dict,
    need_t: bool,
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """Solve the augmented adjoint system from the last output back to ``t_span[0]``; an
    armed ``request`` gets the curvature sampled at the accepted steps."""
    vf, record = problem.vf, record_of(problem)
    nfe = record.nfe
    integral_loss = problem.integral_loss
    solver = problem.solver_adjoint
    shape, n_x = x0.shape, x0.numel()
    sizes = [p.numel() for p in params]

    # Knots the backward solve restarts at: every t_span point up to the last saved output
    # (fixed-step solvers take exactly one step between consecutive points, as forward).
    # Backward "time" s runs forward: s = -σt with σ = +1 for an increasing t_span.
    sigma = 1.0 if float(t_span[-1]) >= float(t_span[0]) else -1.0
    t_out = t_eval * sigma  # torchdyn reports a reversed span's times negated
    # Output i sits at the t_span point nearest to it (torchdyn matches save_at approximately).
    knot_of_out = [int((t_span - t).abs().argmin()) for t in t_out]
    knots = list(t_span[: knot_of_out[-1] + 1])
    out_at_knot = {k: i for i, k in enumerate(knot_of_out)}

    dynamics = _augmented_dynamics(vf, params, integral_loss, sigma, shape, nfe)
    field_at = functools.partial(_field_at, vf)
    ell_at = functools.partial(_ell_at, integral_loss)

    x = sol[-1]
    a = torch.zeros_like(x)
    mu = torch.zeros(sum(sizes), dtype=x.dtype, device=x.device)
    t_grad = torch.zeros_like(t_span) if need_t else None
    seminorm_dim = 2 * n_x if getattr(problem, "seminorm", False) else None
    sampler: SolveSampling | None = None
    if request is not None and request.active:
        batch = shape[0] if len(shape) > 1 else 1
        t_a, t_b = float(knots[0]), float(knots[-1])  # any order
        sampler = SolveSampling(request, vf, t_a, t_b, batch, record.horizon, nfe)

    for k in range(len(knots) - 1, 0, -1):
        t_hi, t_lo = knots[k], knots[k - 1]  # "hi" = later in the forward solve
        i = out_at_knot.get(k)
        if i is not None:
            g = grad_sol[i]
            a = a + g
            if t_grad is not None:  # ∂L/∂t_i = ∂L/∂x(t_i) · F(t_i, x_i)  (+ ℓ at the last time)
                t_grad[k] = (g * field_at(t_hi, x)).sum()
                if k == len(knots) - 1:
                    t_grad[k] += ell_at(t_hi, x)
        on_accept = None
        if sampler is not None:
            sampler.node(float(t_hi), x, a)
            on_accept = _node_reporter(sampler, sigma, n_x, shape)

        y = torch.cat([x.reshape(-1), a.reshape(-1), mu])
        y = integrate(
            dynamics,
            y,
            -sigma * t_hi,
            -sigma * t_lo,
            solver,
            problem.atol_adjoint,
            problem.rtol_adjoint,
            seminorm_dim,
            on_accept,
            args,
        )
        x = y[:n_x].reshape(shape)
        a = y[n_x : 2 * n_x].reshape(shape)
        mu = y[2 * n_x :]
        if sampler is not None:
            sampler.end_interval()

    i0 = out_at_knot.get(0)
    if t_grad is not None:  # ∂L/∂t0 = -a(t0⁺)·F(t0, x0) - ℓ(t0)
        t_grad[0] = -(a * field_at(knots[0], x)).sum() - ell_at(knots[0], x)
    if i0 is not None:
        a = a + grad_sol[i0]
    # Detached: an implicit solver_adjoint differentiates through the dynamics internally.
    param_grads = [g.reshape(p.shape).detach() for g, p in zip(mu.split(sizes), params)]
    return a.reshape(shape).detach(), t_grad, param_grads


def _augmented_dynamics(
    vf: nn.Module,
    params: tuple[Tensor, ...],
    integral_loss: Any,
    sigma: float,
    shape: torch.Size,
    nfe: NFE,
) -> Any:
    """``dy/ds`` of ``y = [x | a | μ]`` (eq. 3-5, 9a) in the backward variable ``s = -σt``."""
    n_x, sizes = shape.numel(), [p.numel() for p in params]

    def dynamics(s: Tensor, y: Tensor) -> Tensor:
        """Augmented dynamics in the backward variable ``s = -σt``: ``dy/ds = -σ dy/dt``."""
        nfe.backward += 1
        t = -sigma * s
        x, a = y[:n_x].reshape(shape), y[n_x : 2 * n_x].reshape(shape)
        create_graph = y.requires_grad  # an implicit solver differentiates through us
        with torch.enable_grad():
            x_ = x if x.requires_grad else x.detach().requires_grad_(True)
            dx = vf(t, x_)
            vjp = torch.autograd.grad(
                dx, (x_, *params), a, allow_unused=True, create_graph=create_graph
            )
            da = vjp[0] if vjp[0] is not None else torch.zeros_like(x)
            if integral_loss is not None:
                dl = torch.autograd.grad(
                    integral_loss(t, x_).sum(), x_, allow_unused=True, create_graph=create_graph
                )[0]
                if dl is not None:
                    da = da + dl
        dmu = [
            g.reshape(-1) if g is not None else torch.zeros(k, dtype=y.dtype, device=y.device)
            for g, k in zip(vjp[1:], sizes)
        ]
        dy_dt = torch.cat([dx.reshape(-1), -da.reshape(-1), *(-m for m in dmu)])
        return -sigma * dy_dt

    return dynamics


def _field_at(vf: nn.Module, t: Tensor, x: Tensor) -> Tensor:
    with torch.no_grad():
        return vf(t, x)


def _ell_at(integral_loss: Any, t: Tensor, x: Tensor) -> Tensor:
    if integral_loss is None:
        return x.new_zeros(())
    with torch.no_grad():
        return integral_loss(t, x).sum()


def _node_reporter(sampler: SolveSampling, sigma: float, n_x: int, shape: torch.Size) -> Any:
    """The solver's accepted-step callback: ``(s, y)`` in backward time -> a curvature node."""

    def accepted(s: Tensor, y: Tensor) -> None:
        sampler.node(-sigma * float(s), y[:n_x].reshape(shape), y[n_x : 2 * n_x].reshape(shape))

    return accepted


def checked_inputs(x: Tensor, t_span: Any, params: tuple[Tensor, ...]) -> Tensor:
    """Refuse, before any solve starts, inputs on which torchdyn's adaptive loop would hang.

    ``x`` must be a finite floating tensor and the field's trainable ``params`` finite and of
    ``x``'s dtype and device; ``t_span`` a 1-D strictly monotonic sequence of >= 2 finite
    times. An integer, other-precision or other-device ``t_span`` is converted to ``x``'s
    dtype and device (as torch's arithmetic would); returns the ``t_span`` to integrate on.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"the initial state x has dtype {kind}; accepted: a floating tensor")
    for p in params:
        if p.dtype != x.dtype or p.device != x.device:
            raise TypeError(
                f"the vector field's parameters are {p.dtype} on {p.device} but the state x is "
                f"{x.dtype} on {x.device}; move one to the other, e.g. model.to(x)"
            )
    # One device sync for every finiteness flag (state first, then each parameter tensor).
    finite = torch.stack([torch.isfinite(t).all() for t in (x, *params)]).tolist()
    if not finite[0]:
        raise ValueError(
            "the initial state x holds non-finite values (NaN or inf); the ODE solve cannot "
            "start from them: check the data and the layers before the NeuralODE"
        )
    if not all(finite[1:]):
        raise ValueError(
            "the vector field has non-finite parameters (NaN or inf); restore a checkpoint "
            "or lower the learning rate"
        )
    t_span = torch.as_tensor(t_span)
    if t_span.dim() != 1 or len(t_span) < 2:
        raise ValueError(
            f"t_span has shape {tuple(t_span.shape)}; accepted: a 1-D tensor of >= 2 times"
        )
    if t_span.dtype != x.dtype or t_span.device != x.device:
        t_span = t_span.to(dtype=x.dtype, device=x.device)
    if not bool(torch.isfinite(t_span).all()):
        raise ValueError(f"t_span={t_span.tolist()} holds non-finite times")
    steps = t_span[1:] - t_span[:-1]
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        raise ValueError(
            f"t_span={t_span.tolist()} is not strictly monotonic; accepted: strictly increasing "
            "or strictly decreasing times, without repeats"
        )
    return t_span


def snopt_odeint(
    problem: ODEProblem,
    vf_params: Tensor,
    x: Tensor,
    t_span: Tensor,
    save_at: Any = (),
    args: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Entry point torchdyn calls as ``problem._autograd_func()(vf_params, x, t_span, ...)``."""
    params = tuple(p for p in problem.vf.parameters() if p.requires_grad)
    t_span = checked_inputs(x, t_span, params)
    request = record_of(problem).request
    if request is not None and torch.is_grad_enabled() and (x.requires_grad or params):
        request.batch_size = x.shape[0] if x.dim() > 1 else 1  # a training call
    return _SNOptAdjoint.apply(problem, request, x, t_span, save_at, args or {}, *params)
