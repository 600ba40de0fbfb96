"""Per-iteration time and peak memory of SNOpt vs Adam with torchdyn's "adjoint".

Measured side by side in one run on the same conv Neural-ODE classifier (digits, batch 128,
dopri5 at 1e-3), from the same weights and the same batch, so every variant integrates the
same ODE with the same number of steps:

- ``adam+adjoint``: torchdyn's own adjoint, Adam step;
- ``snopt plain``: our sensitivity, curvature not armed, SNOpt step;
- ``snopt armed``: curvature sampled in the backward solve and eigenbases refreshed;
- ``snopt amortized``: ``(armed + (k-1)·plain) / k`` for ``update_freq = k``;
- the same with ``full_precond=True`` (K-FAC also for the conv features and the head),
  amortized at ``update_freq = 10`` as the demo runs it.

The weights are restored after every timed step so all repetitions see the same ODE.
Peak memory is the growth of live heap memory (glibc ``mallinfo2``, sampled at every layer
call) during a training step at batch 512 above its starting level, after a warm-up step;
SNOpt runs with ``full_precond=True`` and refreshes its curvature on every step.

    python -m torchdyn_snopt.bench.scripts.core_overhead \\
        [--warmup-iters 60] [--reps 15] [--update-freq 100]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import torchdyn_snopt as tds
from torchdyn_snopt.bench.memory import peak_memory_mb
from torchdyn_snopt.data import load_digits
from torchdyn_snopt.models import ImageClassifier


def _warm_weights(iters: int, seed: int) -> dict:
    """Weights after ``iters`` Adam iterations: a realistic mid-training ODE."""
    torch.manual_seed(seed)
    model = ImageClassifier(sensitivity="adjoint")
    x, y, _, _ = load_digits()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.state_dict()


def _make(variant: str, weights: dict):
    model = ImageClassifier(sensitivity="adjoint" if variant == "adam" else "snopt")
    model.load_state_dict(weights)
    if variant == "adam":
        return model, torch.optim.Adam(model.parameters(), lr=3e-3)
    armed = variant.startswith("armed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # features/head are not preconditioned: expected
        opt = tds.SNOpt(
            model, lr=3e-3, update_freq=1 if armed else 10**9, full_precond=variant.endswith("full")
        )
    return model, opt


def _time_step(model, opt, weights, xb, yb, variant) -> tuple[float, dict]:
    t0 = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(xb), yb).backward()
    opt.step()
    elapsed = time.perf_counter() - t0
    if variant == "adam":  # torchdyn's DEFunc counts every call of the field
        nfe = {"total": int(model.ode.vf.nfe)}
        model.ode.vf.nfe = 0
    else:
        nfe = tds.read_nfe(model)
    model.load_state_dict(weights)
    return elapsed, nfe


def timing(weights: dict, reps: int, seed: int) -> dict:
    x, y, _, _ = load_digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (128,), generator=g)
    xb, yb = x[idx], y[idx]
    variants = ("adam", "plain", "armed", "plain_full", "armed_full")
    setups = {v: _make(v, weights) for v in variants}
    for v, (model, opt) in setups.items():  # first step: SNOpt's initial refresh, Adam's state
        _time_step(model, opt, weights, xb, yb, v)
    times: dict[str, list[float]] = {v: [] for v in setups}
    nfes: dict[str, dict] = {}
    for r in range(reps + 1):  # interleaved so drifts hit every variant alike
        for v, (model, opt) in setups.items():
            dt, nfe = _time_step(model, opt, weights, xb, yb, v)
            if r > 0:
                times[v].append(dt)
                nfes[v] = nfe
    out = {v: statistics.median(ts) for v, ts in times.items()}
    out["nfe"] = nfes
    return out


def peak_memory(weights: dict) -> dict:
    """Peak live-heap growth of a training step at batch 512 (see ``peak_memory_mb``)."""
    x, y, _, _ = load_digits()
    xb, yb = x[:512], y[:512]
    out = {}
    for variant in ("adam", "snopt"):
        model = ImageClassifier(sensitivity="adjoint" if variant == "adam" else "snopt")
        model.load_state_dict(weights)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = (
                torch.optim.Adam(model.parameters(), lr=1e-3)
                if variant == "adam"
                else tds.SNOpt(model, lr=1e-3, update_freq=1, full_precond=True)
            )

        def step(model=model, opt=opt) -> None:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()

        out[variant] = peak_memory_mb(step, model, torch.device("cpu"))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--warmup-iters", type=int, default=60)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--update-freq", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    weights = _warm_weights(args.warmup_iters, args.seed)
    t = timing(copy.deepcopy(weights), args.reps, args.seed)
    k = args.update_freq
    amortized = (t["armed"] + (k - 1) * t["plain"]) / k
    mem = peak_memory(weights)
    amortized_full = (t["armed_full"] + 9 * t["plain_full"]) / 10
    rows = [
        ("adam + torchdyn adjoint", t["adam"], 1.0),
        ("snopt, curvature not armed", t["plain"], t["plain"] / t["adam"]),
        ("snopt, armed (refresh)", t["armed"], t["armed"] / t["adam"]),
        (f"snopt, amortized (update_freq={k})", amortized, amortized / t["adam"]),
        ("snopt full_precond, not armed", t["plain_full"], t["plain_full"] / t["adam"]),
        ("snopt full_precond, armed", t["armed_full"], t["armed_full"] / t["adam"]),
        ("snopt full_precond, amortized (10)", amortized_full, amortized_full / t["adam"]),
    ]
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"reps {args.reps}, weights after {args.warmup_iters} Adam iterations"
    )
    print(f"NFE of the timed batch: {t['nfe']}")
    print(f"{'variant':40s} {'s/iter':>9s} {'× adam':>8s}")
    for name, s, r in rows:
        print(f"{name:40s} {s:9.4f} {r:8.2f}")
    print(
        f"armed / not-armed snopt iteration: {t['armed'] / t['plain']:.2f}× "
        f"(full_precond: {t['armed_full'] / t['plain_full']:.2f}×)"
    )
    print(
        f"peak memory growth of a training step at batch 512: adam+adjoint {mem['adam']:.1f} MB, "
        f"snopt (full_precond, armed every step) {mem['snopt']:.1f} MB, "
        f"ratio {mem['snopt'] / max(mem['adam'], 1e-9):.2f}×"
    )
    result = {
        "seconds_per_iter": t,
        "amortized": amortized,
        "amortized_full_10": amortized_full,
        "peak_memory_growth_mb": mem,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
