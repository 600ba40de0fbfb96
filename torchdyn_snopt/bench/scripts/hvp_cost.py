"""Cost of one exact Hessian-vector product (:func:`tds.second_order.hvp`) vs one gradient.

The digits conv Neural ODE of ``bench image`` (12 channels, dopri5, batch 128, float32 or
float64 with ``--double``), θ = the ODE field's parameters, loss = cross-entropy of the head
at ``t1``. Side by side, from the same weights and batch, at two tolerances (so two numbers
of solver steps):

- ``gradient``: forward solve + our O(1)-memory adjoint (``sensitivity="snopt"``), backward();
- ``hvp``: tangent forward solve + one backward solve of the directional Theorem 1;
- ``autograd hvp``: double backward through the solver's graph (memory grows with steps).

Time: median of ``--reps`` calls. Peak memory: growth of live heap bytes (glibc ``mallinfo2``)
sampled at every layer call, as in ``bench image``. Steps: field evaluations per call.

    python -m torchdyn_snopt.bench.scripts.hvp_cost \\
        [--reps 5] [--tols 1e-3,1e-5] [--json hvp_cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import torchdyn_snopt as tds
from torchdyn_snopt.bench.memory import peak_memory_mb
from torchdyn_snopt.data import load_digits
from torchdyn_snopt.models import ImageClassifier


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(sens: str, tol: float, weights: dict, xb, yb, reps: int) -> dict:
    """Time, field evaluations and peak memory of each method of one sensitivity."""
    model = ImageClassifier(sensitivity=sens, tol=tol).to(xb.dtype)
    model.load_state_dict(weights)
    node, theta = model.ode, list(model.ode.vf.parameters())
    with torch.no_grad():
        x0 = model.features(xb)
    v = torch.randn(sum(q.numel() for q in theta), generator=torch.Generator().manual_seed(1))
    v = v.to(xb.dtype)

    def loss_fn(sol):
        return F.cross_entropy(model.head(sol[-1].flatten(1)), yb)

    def gradient():
        model.zero_grad()
        loss_fn(node(x0, model.t_span)).backward()

    def product():
        tds.second_order.hvp(node, x0, loss_fn, v, model.t_span)

    def autograd_hvp():
        g = torch.autograd.grad(loss_fn(node(x0, model.t_span)), theta, create_graph=True)
        torch.autograd.grad(torch.cat([q.reshape(-1) for q in g]) @ v, theta)

    calls = [0]
    hook = node.vf.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    named = (
        {"gradient": gradient, "hvp": product}
        if sens == "snopt"
        else {"autograd hvp": autograd_hvp}
    )
    out = {}
    for name, fn in named.items():
        calls[0] = 0
        fn()
        evals = calls[0]
        out[name] = {
            "seconds": median_time(fn, reps),
            "field_evals": evals,
            "peak_mb": peak_memory_mb(fn, node.vf, torch.device("cpu")),
        }
    hook.remove()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--tols", default="1e-3,1e-6")
    p.add_argument("--json", default=None)
    p.add_argument("--double", action="store_true", help="float64 (for tolerances below 1e-6)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y, _, _ = load_digits(dtype=torch.float64 if args.double else torch.float32)
    xb, yb = x[: args.batch], y[: args.batch]
    weights = ImageClassifier().state_dict()
    rows = []
    for tol in (float(t) for t in args.tols.split(",")):
        results = {"tol": tol}
        results.update(measure("snopt", tol, weights, xb, yb, args.reps))
        results.update(measure("autograd", tol, weights, xb, yb, args.reps))
        results["ratio_hvp_to_gradient"] = (
            results["hvp"]["seconds"] / results["gradient"]["seconds"]
        )
        rows.append(results)
    dtype = "float64" if args.double else "float32"
    print(f"digits conv Neural ODE, batch {args.batch}, {dtype}, dopri5; 1 thread")
    print(f"{'tol':>7} {'method':>13} {'seconds':>9} {'evals':>7} {'peak MB':>9}")
    for r in rows:
        for name in ("gradient", "hvp", "autograd hvp"):
            m = r[name]
            print(
                f"{r['tol']:>7g} {name:>13} {m['seconds']:>9.3f} {m['field_evals']:>7d} "
                f"{m['peak_mb']:>9.2f}"
            )
        print(f"{'':>7} {'hvp/gradient':>13} {r['ratio_hvp_to_gradient']:>9.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
