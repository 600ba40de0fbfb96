"""Losses on a trajectory, gradients of a Neural ODE as named blocks, and their comparison
per block at measured tolerances."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from tests.helpers.data import default_t_span, mlp_data
from tests.helpers.models import FieldFn, make_node
from tests.helpers.numerics import ABS_FLOOR, REL, TOL

LossFn = Callable[[Tensor], Tensor]
Blocks = dict[str, Tensor]


def trajectory_loss(sol: Tensor) -> Tensor:
    """Weighted loss on every output (the initial one included), linear and quadratic terms."""
    w = torch.arange(1, len(sol) + 1, dtype=sol.dtype, device=sol.device)
    w = w.reshape(-1, *([1] * (sol.dim() - 1)))
    return (w * (sol**2 + 0.5 * sol)).sum() / sol[0].numel()


def last_loss(sol: Tensor) -> Tensor:
    return (sol[-1] ** 2).sum()


def cross_loss(sol: Tensor) -> Tensor:
    """Loss over several outputs with cross terms between them (non-separable in time)."""
    return (sol[-1] ** 2).sum() + 0.3 * (sol[1] * sol[-1]).sum() + torch.sin(sol[1]).sum()


def grads(
    model_fn: FieldFn,
    sensitivity: str,
    solver: str | nn.Module = "dopri5",
    *,
    x0: Tensor | None = None,
    t_span: Tensor | None = None,
    loss_fn: LossFn = trajectory_loss,
    save_at: Sequence | Tensor = (),
    tol: float = TOL,
    solver_adjoint: str | nn.Module | None = None,
    integral_loss: Callable | None = None,
    seminorm: bool = False,
    t_grad: bool = False,
) -> Blocks:
    """Gradient of ``loss_fn(trajectory)`` as blocks: one per field parameter (by name), then
    ``"x0"`` and, with ``t_grad``, ``"t_span"``."""
    field = model_fn()
    node = make_node(
        field,
        sensitivity,
        solver,
        tol=tol,
        solver_adjoint=solver_adjoint,
        integral_loss=integral_loss,
        seminorm=seminorm,
    )
    x0 = mlp_data() if x0 is None else x0
    t_span = default_t_span(node.solver) if t_span is None else t_span
    x = x0.clone().requires_grad_(True)
    t = t_span.detach().clone().requires_grad_(t_grad)
    _, sol = node(x, t, save_at=save_at)
    named = [(n, p) for n, p in field.named_parameters() if p.requires_grad]
    named += [("x0", x)] + ([("t_span", t)] if t_grad else [])
    g = torch.autograd.grad(loss_fn(sol), [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if q is None else q for (n, p), q in zip(named, g, strict=True)}


def flat(blocks: Blocks | Tensor) -> Tensor:
    """All blocks as one vector (in order)."""
    if isinstance(blocks, Tensor):
        return blocks.reshape(-1)
    return torch.cat([b.reshape(-1) for b in blocks.values()])


def _as_blocks(x: Blocks | Tensor) -> Blocks:
    return {"": x} if isinstance(x, Tensor) else x


def block_errors(a: Blocks | Tensor, b: Blocks | Tensor, floor: float = ABS_FLOOR) -> Blocks:
    """``‖a_k − b_k‖ / max(‖b_k‖, floor)`` for every block ``k`` (a tensor is one block)."""
    a, b = _as_blocks(a), _as_blocks(b)
    assert list(a) == list(b), (list(a), list(b))
    out = {}
    for k in b:
        ak, bk = a[k].detach(), b[k].detach()
        assert ak.shape == bk.shape, (k, ak.shape, bk.shape)
        assert torch.isfinite(ak).all() and torch.isfinite(bk).all(), k
        out[k] = float((ak - bk).norm()) / max(float(bk.norm()), floor)
    return out


def rel_err(a: Blocks | Tensor, b: Blocks | Tensor, floor: float = ABS_FLOOR) -> float:
    """Worst per-block relative error (see :func:`block_errors`)."""
    return max(block_errors(a, b, floor).values())


def assert_close(a: Blocks | Tensor, b: Blocks | Tensor, rel: float = REL) -> None:
    """Every block of ``a`` within ``rel`` of ``b``'s block, relative to that block's own norm
    (floored at :data:`ABS_FLOOR`): an error confined to ``x0`` or one small layer is caught."""
    errs = block_errors(a, b)
    _record(errs, rel)
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= rel}
    assert not bad, f"per-block relative error above {rel:.1e}: {bad}"


def _record(errs: Blocks, rel: float) -> None:
    """With ``SNOPT_MEASURE=path``, append the worst block error of each comparison (used to
    measure the tolerances' headroom; off by default)."""
    path = os.environ.get("SNOPT_MEASURE")
    if path:
        worst = max(errs, key=errs.get)
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{errs[worst]:.3e}\t{rel:.1e}\t{worst}\t{test}\n")
