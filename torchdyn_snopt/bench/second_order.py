"""``torchdyn-snopt bench second-order``: SNOpt vs exact Newton-type methods (Fig. 11).

The digits model of ``bench image`` (conv features → conv Neural ODE, dopri5 at 1e-3 → linear
head), trained for the same wall-clock from the same weights and minibatches by:

- ``snopt``: SNOpt (Kronecker-factored curvature sampled in the adjoint solve);
- ``newton-cg``: damped Newton-CG, ``cg_iters`` conjugate-gradient steps on
  ``(L_θθ + λI) d = -∇L`` per minibatch, every product by the exact matrix-free
  :func:`~torchdyn_snopt.second_order.hvp` over *all* parameters (features, ODE, head);
- ``newton-cg-recursive``: the same Newton-CG with products from the recursive adjoint (§2):
  ``∇(∇L · v)`` by double backward through
  :func:`~torchdyn_snopt.second_order.recursive_adjoint_odeint`.

The gradient of every method comes from the same ``loss.backward()`` (our adjoint).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from torchdyn_snopt.bench import image
from torchdyn_snopt.bench.image import DEFAULT_LRS, SNOPT_OPTIONS
from torchdyn_snopt.bench.outputs import write_outputs
from torchdyn_snopt.bench.records import summary_rows
from torchdyn_snopt.bench.session import Session, check_run_args
from torchdyn_snopt.bench.trial import Trial
from torchdyn_snopt.optim import SNOpt
from torchdyn_snopt.second_order import hvp, recursive_adjoint_odeint

OPTIMIZERS: tuple[str, ...] = ("snopt", "newton-cg", "newton-cg-recursive")
DEFAULT_LRS_2: dict[str, float] = {
    "snopt": DEFAULT_LRS["digits"]["snopt"],
    "newton-cg": 1.0,
    "newton-cg-recursive": 1.0,
}
#: Tikhonov damping λ and CG iterations of both Newton-CG variants (λ = 1 diverged on digits;
#: λ = 3, lr 1 was the best of (lr, λ) in {(1, 10), (0.5, 3), (1, 3)} in 8-s runs).
NEWTON_OPTIONS: dict[str, Any] = {"damping": 3.0, "cg_iters": 3}

Hvp = Callable[[Tensor, Tensor, Tensor], Tensor]


class NewtonCG(torch.optim.Optimizer):
    """Damped, truncated Newton: ``θ ← θ + lr·d`` with ``d`` from ``cg_iters`` CG steps on
    ``(H + λI) d = -g`` (``g`` = the parameters' ``.grad``), stopped early on non-positive
    curvature. ``hvp_fn(x, y, v)`` gives ``H v`` (flat) on the batch set by :meth:`set_batch`.
    """

    def __init__(
        self,
        params: Any,
        hvp_fn: Hvp,
        lr: float = 1.0,
        damping: float = 1.0,
        cg_iters: int = 3,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr={lr!r} is invalid; accepted: a float > 0")
        if not damping >= 0:
            raise ValueError(f"damping={damping!r} is invalid; accepted: a float >= 0")
        if cg_iters < 1:
            raise ValueError(f"cg_iters={cg_iters!r} is invalid; accepted: an int >= 1")
        super().__init__(params, {"lr": lr})
        self.hvp_fn, self.damping, self.cg_iters = hvp_fn, damping, cg_iters
        self._batch: tuple[Tensor, Tensor] | None = None

    def set_batch(self, x: Tensor, y: Tensor) -> None:
        self._batch = (x, y)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D102
        if self._batch is None:
            raise RuntimeError("NewtonCG.step: call set_batch(x, y) first")
        params = [p for g in self.param_groups for p in g["params"]]
        g = torch.cat(
            [torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in params]
        )
        d = _cg(lambda v: self.hvp_fn(*self._batch, v) + self.damping * v, -g, self.cg_iters)
        lr = self.param_groups[0]["lr"]
        for p, c in zip(params, d.split([p.numel() for p in params])):
            p.add_(c.reshape(p.shape), alpha=lr)


def _cg(apply: Callable[[Tensor], Tensor], b: Tensor, iters: int) -> Tensor:
    """Conjugate gradients from 0; returns the last iterate with positive curvature."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), float(r @ r)
    for _ in range(iters):
        ap = apply(p)
        curv = float(p @ ap)
        if curv <= 0 or not math.isfinite(curv):
            return x if x.any() else b  # first direction: fall back to -g
        alpha = rr / curv
        x, r = x + alpha * p, r - alpha * ap
        rr_new = float(r @ r)
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def exact_hvp(model: nn.Module) -> Hvp:
    """Whole-model ``H v`` by :func:`hvp` (directional Theorem 1)."""
    params = list(model.parameters())

    def fn(x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        with torch.enable_grad():
            z0 = model.features(x)
            return hvp(
                model.ode,
                z0,
                lambda sol: F.cross_entropy(model.head(sol[-1].flatten(1)), y),
                v,
                model.t_span,
                params=params,
            )

    return fn


def recursive_hvp(model: nn.Module) -> Hvp:
    """Whole-model ``H v`` by double backward through the recursive adjoint (§2)."""
    params = list(model.parameters())

    def fn(x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        with torch.enable_grad():
            sol = recursive_adjoint_odeint(model.ode, model.features(x), model.t_span)
            loss = F.cross_entropy(model.head(sol[-1].flatten(1)), y)
            g = torch.autograd.grad(loss, params, create_graph=True)
            flat = torch.cat([q.reshape(-1) for q in g])
            h = torch.autograd.grad(flat @ v, params)
        return torch.cat([q.reshape(-1) for q in h])

    return fn


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    snopt_options: Mapping[str, Any] = SNOPT_OPTIONS,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """SNOpt (``snopt_options``) or Newton-CG with exact or recursive products
    (:data:`NEWTON_OPTIONS`); the task's optimizer factory. No weight decay (ValueError)."""
    if weight_decay:
        raise ValueError(f"weight_decay={weight_decay!r} is invalid here; accepted: 0")
    if name == "snopt":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SNOpt(model, lr=lr, **snopt_options)
    if name == "newton-cg":
        return NewtonCG(model.parameters(), exact_hvp(model), lr=lr, **NEWTON_OPTIONS)
    if name == "newton-cg-recursive":
        return NewtonCG(model.parameters(), recursive_hvp(model), lr=lr, **NEWTON_OPTIONS)
    raise ValueError(f"optimizer={name!r} is unknown; accepted: {', '.join(OPTIMIZERS)}")


def bench_second_order(
    budget_s: float = 20.0,
    seeds: int = 1,
    optimizers: tuple[str, ...] = OPTIMIZERS,
    lrs: dict[str, float] | None = None,
    out: str | Path = "runs/second_order",
    quiet: bool = False,
    batch_size: int = 128,
    n_evals: int = 10,
) -> dict[str, Any]:
    """Run the Fig. 11 comparison on digits (CPU); returns ``{"summary", "runs", "files"}``.
    Newton-CG gets each minibatch again before its step (``set_batch``)."""
    check_run_args(tuple(optimizers), OPTIMIZERS, budget_s, seeds)
    unknown = [k for k in (lrs or {}) if k not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"lrs={lrs!r} names {unknown}; accepted: {', '.join(OPTIMIZERS)}")
    chosen = {**DEFAULT_LRS_2, **(lrs or {})}
    spec = replace(
        image.task("digits", batch_size), n_evals=n_evals, make_optimizer=build_optimizer
    )
    session = Session.open("cpu", out, quiet)
    data = spec.load()
    session.report(
        f"digits: {len(data[0])} train / {len(data[2])} test images, batch {batch_size}, "
        f"{budget_s:g} s of training per run"
    )
    trials = [
        Trial(spec, name, chosen[name], seed, budget_s)
        for seed in range(seeds)
        for name in optimizers
    ]
    runs = session.run(trials, data)
    rows = summary_rows(runs, references=("snopt",))
    files = write_outputs(
        runs,
        rows,
        session.out,
        "second_order_digits",
        f"digits: SNOpt vs Newton-CG, {budget_s:g} s per run, {seeds} seed(s)",
    )
    session.finish(
        rows,
        files,
        "learning rates: "
        + ", ".join(f"{o}={chosen[o]:g}" for o in optimizers)
        + f"; Newton-CG {NEWTON_OPTIONS}; SNOpt {SNOPT_OPTIONS}",
    )
    return {"summary": rows, "runs": runs, "files": files}
