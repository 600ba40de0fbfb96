"""Table 1: errors of adjoint derivatives against ground truth, recursive adjoint vs Theorem 1.

A small conv Neural ODE on digits (float64): a fixed random stem (conv 1→C, stride 2) maps 8×8
digits to ``C×4×4`` maps, the ODE field is ``conv(tanh(conv(x)))`` (θ: ``2(9C² + C)``
parameters), and a fixed random linear head gives the cross-entropy loss at ``t1 = 1``.

- ground truth: autograd through a fine fixed-step RK4 solve (``--truth-steps`` steps,
  float64); the Hessian column by column with forward-over-reverse (``torch.func``); the
  difference to a solve with half the steps is printed as the truth's own uncertainty;
- recursive adjoint (§2): the adjoint gradient, then ``torch.autograd.functional.hessian``
  differentiating it again (:func:`~torchdyn_snopt.second_order.recursive_adjoint_hessian`);
- Theorem 1: one backward solve of eq. 10 (:func:`~torchdyn_snopt.second_order.hessian`).

Both use the same solver and tolerances per column (fixed-step solvers: ``--fixed-steps``
intervals of ``t_span``). Errors are relative Frobenius norms ``‖est − truth‖ / ‖truth‖``.

    python -m torchdyn_snopt.bench.scripts.table1 \\
        [--batch 4] [--channels 4] [--tol 1e-3] [--json table1.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jvp, vmap
from torchdyn.core import NeuralODE
from torchdyn.numerics.solvers.ode import SOLVER_DICT

from torchdyn_snopt.data import load_digits
from torchdyn_snopt.second_order import hessian, recursive_adjoint_hessian

DTYPE = torch.float64
SOLVERS = ("rk4", "tsit5", "dopri5")


class Field(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, t, x, args=None):
        return self.c2(torch.tanh(self.c1(x)))


def setup(batch: int, channels: int, seed: int):
    torch.manual_seed(seed)
    stem = nn.Conv2d(1, channels, 3, stride=2, padding=1).to(DTYPE)
    field = Field(channels).to(DTYPE)
    head = nn.Linear(channels * 16, 10).to(DTYPE)
    x, y, _, _ = load_digits(dtype=DTYPE)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:batch]
    with torch.no_grad():
        x0 = torch.relu(stem(x[idx]))
    labels = y[idx]

    def loss_fn(sol):
        return F.cross_entropy(head(sol[-1].flatten(1)), labels)

    return field, x0, loss_fn


def truth(field: nn.Module, x0, loss_fn, steps: int, chunk: int = 16):
    """Gradient and Hessian by autograd through ``steps`` RK4 steps (forward-over-reverse)."""
    names = [n for n, _ in field.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in field.parameters()])
    shapes = [p.shape for p in field.parameters()]

    def loss(flat):
        ps = dict(
            zip(
                names,
                (c.reshape(s) for c, s in zip(flat.split([s.numel() for s in shapes]), shapes)),
            )
        )

        def f(x):
            return functional_call(field, ps, (None, x))

        x, h = x0, 1.0 / steps
        for _ in range(steps):
            k1 = f(x)
            k2 = f(x + 0.5 * h * k1)
            k3 = f(x + 0.5 * h * k2)
            k4 = f(x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return loss_fn(x[None])

    grad_fn = torch.func.grad(loss)
    g = grad_fn(theta)
    eye = torch.eye(len(theta), dtype=DTYPE)
    cols = [
        vmap(lambda v: jvp(grad_fn, (theta,), (v,))[1])(eye[i : i + chunk])
        for i in range(0, len(theta), chunk)
    ]
    return g.detach(), torch.cat(cols).detach()


def node_for(field: nn.Module, solver: str, tol: float) -> NeuralODE:
    s = SOLVER_DICT[solver](dtype=DTYPE)
    kw = {} if s.stepping_class == "fixed" else {"atol": tol, "rtol": tol}
    return NeuralODE(field, solver=s, atol_adjoint=tol, rtol_adjoint=tol, **kw)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--tol", type=float, default=1e-3, help="adaptive solvers, both solves")
    p.add_argument("--fixed-steps", type=int, default=10, help="t_span intervals for rk4")
    p.add_argument("--truth-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)

    field, x0, loss_fn = setup(args.batch, args.channels, args.seed)
    n = sum(q.numel() for q in field.parameters())
    print(f"conv Neural ODE on digits: batch {args.batch}, state M={x0.numel()}, θ n={n}")
    start = time.perf_counter()
    g_true, h_true = truth(field, x0, loss_fn, args.truth_steps)
    g_half, h_half = truth(field, x0, loss_fn, args.truth_steps // 2)
    print(
        f"ground truth: RK4, {args.truth_steps} steps ({time.perf_counter() - start:.1f} s); "
        f"vs {args.truth_steps // 2} steps: grad {rel(g_half, g_true):.1e}, "
        f"Hessian {rel(h_half, h_true):.1e}"
    )

    results = {}
    for solver in SOLVERS:
        node = node_for(field, solver, args.tol)
        fixed = node.solver.stepping_class == "fixed"
        t_span = torch.linspace(0, 1, (args.fixed_steps if fixed else 1) + 1, dtype=DTYPE)
        t0 = time.perf_counter()
        out = hessian(node, x0, loss_fn, t_span, return_blocks=True)
        t_thm = time.perf_counter() - t0
        t0 = time.perf_counter()
        h_rec = recursive_adjoint_hessian(node, x0, loss_fn, t_span)
        t_rec = time.perf_counter() - t0
        # The recursion's first derivative is the plain adjoint gradient (level one).
        from torchdyn_snopt.second_order import recursive_adjoint_odeint

        theta = list(field.parameters())
        g_rec = torch.autograd.grad(loss_fn(recursive_adjoint_odeint(node, x0, t_span)), theta)
        g_rec = torch.cat([q.reshape(-1) for q in g_rec])
        results[solver] = {
            "recursive_grad": rel(g_rec, g_true),
            "recursive_hessian": rel(h_rec, h_true),
            "theorem1_grad": rel(out.grad, g_true),
            "theorem1_hessian": rel(out.uu, h_true),
            "recursive_s": t_rec,
            "theorem1_s": t_thm,
        }

    def row(label, key, fmt="{:.2e}"):
        return f"{label:<28}" + "".join(f"{fmt.format(results[s][key]):>12}" for s in SOLVERS)

    print()
    print(f"{'':<28}" + "".join(f"{s:>12}" for s in SOLVERS))
    print("recursive adjoint (§2)")
    print(row("  dL/dθ", "recursive_grad"))
    print(row("  d²L/dθ²", "recursive_hessian"))
    print(row("  time for d²L/dθ² (s)", "recursive_s", "{:.1f}"))
    print("Theorem 1, one solve (eq. 10)")
    print(row("  dL/dθ", "theorem1_grad"))
    print(row("  d²L/dθ²", "theorem1_hessian"))
    print(row("  time for both (s)", "theorem1_s", "{:.1f}"))
    print(
        f"relative Frobenius errors; adaptive solvers at atol=rtol={args.tol:g}, rk4 with "
        f"{args.fixed_steps} steps"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "n": n, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
