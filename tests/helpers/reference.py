"""Ground truths the tests compare against: an RK4/autograd reference of the gradient and
autograd Hessians through the solve, and the second-order test cases."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE
from torchdyn.nn import DepthCat
from torchdyn.numerics.odeint import odeint

from tests.helpers.data import conv_data, mlp_data
from tests.helpers.gradients import Blocks, LossFn, cross_loss, last_loss, trajectory_loss
from tests.helpers.models import FieldFn, depthcat_field, mlp_field, tiny_conv_field
from tests.helpers.numerics import DTYPE


def timed(field: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``(t, x) -> field(x)`` with every ``DepthCat`` of ``field`` set to ``t`` first (a
    ``Sequential``), or ``field(t, x)`` for a field that takes the time itself."""

    def f(t: Tensor, x: Tensor) -> Tensor:
        if not isinstance(field, nn.Sequential):
            return field(t, x)
        for m in field.modules():
            if isinstance(m, DepthCat):
                m.t = t
        return field(x)

    return f


def rk4_interval(f: Callable, x: Tensor, t_a: Tensor, t_b: Tensor, steps: int) -> Tensor:
    """Classical RK4 from ``t_a`` to ``t_b`` (either direction) in ``steps`` equal steps, stage
    times ``t, t+h/2, t+h/2, t+h`` (torchdyn 1.0.6's rk4 puts them at ``t, t+h/2, t+h/2``).
    Differentiable w.r.t. ``x``, the end times and ``f``'s parameters."""
    h = (t_b - t_a) / steps
    for k in range(steps):
        t = t_a + k * h
        k1 = f(t, x)
        k2 = f(t + h / 2, x + h / 2 * k1)
        k3 = f(t + h / 2, x + h / 2 * k2)
        k4 = f(t + h, x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def rk4_reference(
    model_fn: FieldFn,
    x0: Tensor,
    t_span: Tensor,
    loss_fn: LossFn = trajectory_loss,
    steps: int = 400,
) -> Blocks:
    """Ground truth (IMPLEMENTATION-NOTES, Table 1): gradient blocks of ``loss_fn`` (parameters,
    ``"x0"``, ``"t_span"``) by autograd through :func:`rk4_interval` in float64, ``steps`` steps
    per ``t_span`` interval, ``model_fn()``'s field seeing the true time (:func:`timed`)."""
    field = model_fn()
    f = timed(field)
    x = x0.detach().clone().requires_grad_(True)
    t = t_span.detach().clone().requires_grad_(True)
    sol = [x]
    for k in range(len(t) - 1):
        sol.append(rk4_interval(f, sol[-1], t[k], t[k + 1], steps))
    named = [(n, p) for n, p in field.named_parameters() if p.requires_grad]
    named += [("x0", x), ("t_span", t)]
    g = torch.autograd.grad(loss_fn(torch.stack(sol)), [p for _, p in named])
    return {n: q for (n, _), q in zip(named, g)}


def autograd_loss(node: NeuralODE, x0: Tensor, loss_fn: LossFn, t_span: Tensor):
    """``(x0, *θ) -> loss_fn(trajectory)`` by autograd through torchdyn's ``odeint`` with the
    node's forward solver and tolerances (the reference for the second-order tests)."""
    from torch.func import functional_call

    names = [n for n, p in node.vf.named_parameters() if p.requires_grad]

    def loss(x: Tensor, *theta: Tensor) -> Tensor:
        def f(t, z):
            return functional_call(node.vf, dict(zip(names, theta)), (t, z))

        _, sol = odeint(f, x, t_span, node.solver, node.atol, node.rtol)
        return loss_fn(sol)

    return loss


def dense_blocks(blocks, sizes: Sequence[int]) -> Tensor:
    """Nested tuple of blocks (``torch.autograd.functional.hessian``) → one dense matrix."""
    return torch.cat(
        [
            torch.cat([blocks[i][j].reshape(si, sj) for j, sj in enumerate(sizes)], 1)
            for i, si in enumerate(sizes)
        ],
        0,
    )


def autograd_hessian(node: NeuralODE, x0: Tensor, loss_fn: LossFn, t_span: Tensor) -> Tensor:
    """Dense Hessian over ``(x0, θ)`` (x0 first), by autograd through the solve."""
    theta = tuple(p.detach() for p in node.vf.parameters() if p.requires_grad)
    fn = autograd_loss(node, x0, loss_fn, t_span)
    blocks = torch.autograd.functional.hessian(fn, (x0.detach(), *theta))
    return dense_blocks(blocks, [x0.numel(), *(p.numel() for p in theta)])


#: Second-order tests: tolerance, time grids and (field, data, loss, t_span) cases.
SECOND_ORDER_REL = 1e-6
T_SPAN_2 = torch.tensor([0.0, 1.0], dtype=DTYPE)
T_SPAN_4 = torch.linspace(0.0, 1.0, 4, dtype=DTYPE)
SECOND_ORDER_CASES = {
    "mlp-terminal": (lambda: mlp_field(3, 6), lambda: mlp_data(2, 3), last_loss, T_SPAN_2),
    "mlp-cross-points": (lambda: mlp_field(3, 6), lambda: mlp_data(2, 3), cross_loss, T_SPAN_4),
    "mlp-every-point": (
        lambda: mlp_field(3, 6),
        lambda: mlp_data(2, 3),
        trajectory_loss,
        T_SPAN_4,
    ),
    "t-dependent": (lambda: depthcat_field(3, 6), lambda: mlp_data(2, 3), cross_loss, T_SPAN_4),
    "conv": (tiny_conv_field, lambda: conv_data(1, 2, 4), last_loss, T_SPAN_2),
}
