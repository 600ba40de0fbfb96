"""Issue 4: why SNOpt is unstable on the Neural CDE on BasicMotions (iteration counts, no timing).

Full batch (40 series), seed ``--seed``: training loss every 10 iterations, and with
``--check ITERS`` per layer group at those iterations

- ``<P,G>``: the curvature of SNOpt's own model along its preconditioned gradient ``P``
  (``Σ (m + eps) P'²`` in the Kronecker eigenbasis),
- ``PᵀGGN P``: the true Gauss-Newton curvature of the loss along ``P`` (central differences of
  the logits of a float64 autograd twin),

whose ratio says by how much SNOpt's model misjudges the curvature along the step (a step of
size ``lr_eff`` is stable along ``P`` only when ``lr_eff · ratio < 2``; with momentum 0.9,
``lr_eff ≈ 10·lr``). ``--trace`` compares ``tr(Ā)·tr(B̄)`` of a fresh refresh with the
per-sample squared gradient norm ``E_i ‖∇L_i‖²`` (the scale the factors should have).

    OMP_NUM_THREADS=1 python -m torchdyn_snopt.bench.scripts.ncde_stability \\
        --eps 0.05 --check 0,15,30,35,38
    OMP_NUM_THREADS=1 python -m torchdyn_snopt.bench.scripts.ncde_stability \\
        --trace --dataset JapaneseVowels
    OMP_NUM_THREADS=1 python -m torchdyn_snopt.bench.scripts.ncde_stability --xscale 0.1 --seed 1

``--xscale`` multiplies BasicMotions' standardized value channels before the path is built
(default 1: the unscaled path the diagnosis started from; ``bench timeseries`` now uses 0.1,
``PATH_SCALE``). The script reports training loss.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
from torch.func import functional_call

from torchdyn_snopt.bench.timeseries import build_model, prepare
from torchdyn_snopt.optim import SNOpt

GROUPS = ("initial", "func.net.0", "func.net.2", "head")


def ggn_quad(twin, params, d, x, y, h=1e-5) -> float:
    """``dᵀ GGN d`` of the mean cross-entropy at ``params`` (float64 central differences)."""
    with torch.no_grad():
        base = {n: p.double() for n, p in params.items()}

        def logits(s: float) -> torch.Tensor:
            return functional_call(twin, {n: base[n] + s * d[n].double() for n in base}, (x,))

        jd = (logits(h) - logits(-h)) / (2 * h)
        pr = torch.softmax(logits(0.0), -1)
        quad = (pr * jd.square()).sum(-1) - (pr * jd).sum(-1).square()
        return quad.mean().item()


def trace_check(dataset: str, seed: int) -> None:
    data, channels, classes = prepare(dataset, "ncde", torch.device("cpu"), path_scale=1.0)
    x, y = data[0][:40], data[1][:40]
    torch.manual_seed(seed)
    model = build_model("ncde", channels, classes, "snopt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = SNOpt(model, lr=1e-2, update_freq=10, full_precond=True)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    modules = dict(model.named_modules())
    per_sample = dict.fromkeys(GROUPS, 0.0)
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for g in GROUPS:
            m = modules[g]
            per_sample[g] += (m.weight.grad.square().sum() + m.bias.grad.square().sum()).item()
    for name, f in opt.preconditioner.last_factors.items():
        kfac = (f.A.trace() * f.B.trace()).item()
        ps = per_sample[name] / len(x)
        print(f"{name:11s} tr(A)tr(B) {kfac:10.4g}  E||g_i||^2 {ps:10.4g}  ratio {ps / kfac:.3g}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--opt", default="snopt", choices=("snopt", "adam", "sgd"))
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--iters", type=int, default=80)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--eps", type=float, default=0.05)
    p.add_argument("--update-freq", type=int, default=10)
    p.add_argument("--full-precond", type=int, default=1)
    p.add_argument("--kl-clip", type=float, default=None)
    p.add_argument("--alpha", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", default="", help="iterations at which to compare curvatures")
    p.add_argument("--trace", action="store_true", help="only the factor-scale check")
    p.add_argument("--dataset", default="BasicMotions")
    p.add_argument(
        "--xscale", type=float, default=1.0, help="multiply the value channels (not time)"
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.trace:
        trace_check(a.dataset, a.seed)
        return
    data, channels, classes = prepare(
        "BasicMotions", "ncde", torch.device("cpu"), path_scale=a.xscale
    )
    x, y = data[0], data[1]
    torch.manual_seed(a.seed)
    model = build_model("ncde", channels, classes, "snopt")
    twin = build_model("ncde", channels, classes, "autograd").double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if a.opt == "snopt":
            opt = SNOpt(
                model,
                lr=a.lr,
                momentum=a.momentum,
                eps=a.eps,
                update_freq=a.update_freq,
                full_precond=bool(a.full_precond),
                kl_clip=a.kl_clip,
                alpha=a.alpha,
            )
        elif a.opt == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=a.lr)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum)
    check = {int(s) for s in a.check.split(",") if s}
    if check and a.opt != "snopt":
        raise SystemExit("--check needs --opt snopt")
    captured: dict[str, torch.Tensor] = {}
    if check:
        precondition = opt.preconditioner.step

        def step_and_capture() -> bool:
            ok = precondition()
            captured.update({n: q.grad.detach().clone() for n, q in model.named_parameters()})
            return ok

        opt.preconditioner.step = step_and_capture
    losses: list[float] = []
    for it in range(a.iters):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads = {n: q.grad.detach().clone() for n, q in model.named_parameters()}
        before = {n: q.detach().clone() for n, q in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
        if it in check:
            print(f"-- iteration {it}, loss {loss.item():.4f}")
            for g in GROUPS:
                names = [n for n in grads if n.startswith(g + ".")]
                d = {n: captured[n] if n in names else torch.zeros_like(grads[n]) for n in grads}
                model_curv = sum((captured[n] * grads[n]).sum().item() for n in names)
                true_curv = ggn_quad(twin, before, d, x.double(), y)
                print(
                    f"   {g:11s} <P,G> {model_curv:10.4g}  PᵀGGN P {true_curv:10.4g}  "
                    f"ratio {true_curv / model_curv:9.3g}"
                )
        if (it + 1) % 10 == 0:
            print(f"iteration {it + 1:3d}: mean loss of the last 10 {sum(losses[-10:]) / 10:.4f}")
        if not math.isfinite(loss.item()):
            break


if __name__ == "__main__":
    main()
