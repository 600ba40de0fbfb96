"""Per-iteration time of SNOpt vs Adam on the time-series models, measured interleaved.

``bench timeseries`` reports seconds per iteration from whole training runs, one optimizer
after the other, so a shared machine's drift between runs (we have seen 30% within minutes)
lands on one optimizer only, and the runs integrate different ODEs once their weights part.
Here both optimizers step the bench's model of ``--dataset``/``--model`` from the same weights
on the same minibatch, the weights restored after every timed step, in interleaved
repetitions:

- ``adam``: Adam step (on the snopt adjoint, never armed, as in the bench);
- ``snopt plain``: SNOpt step between refreshes (curvature not sampled);
- ``snopt armed``: curvature sampled in the backward solve and eigenbases refreshed;
- ``snopt amortized``: ``(armed + (k-1)·plain) / k`` at the bench's ``update_freq = k``.

The weights are those after ``--warmup-iters`` Adam iterations of the bench's minibatch
stream (a mid-training ODE); the order of the three variants rotates between repetitions.
Run it single-threaded, like the bench's tables:

    OMP_NUM_THREADS=1 python -m torchdyn_snopt.bench.scripts.timeseries_overhead \\
        [--dataset BasicMotions]
        [--model odernn] [--reps 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchdyn_snopt.bench.optimizers import make_optimizer
from torchdyn_snopt.bench.timeseries import (
    BATCH_SIZES,
    DEFAULT_LRS,
    DEFAULT_WEIGHT_DECAYS,
    SNOPT_OPTIONS,
    build_model,
    prepare,
)

VARIANTS = ("adam", "plain", "armed")


def _warm_weights(model: nn.Module, data: tuple, batch: int, iters: int, lr: float) -> dict:
    """Weights after ``iters`` Adam iterations on the bench's first minibatches."""
    x, y = data[0], data[1]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    perm, cursor = torch.randperm(len(x), generator=g), 0
    for _ in range(iters):  # drawn as ``train_for`` draws seed 0's minibatches
        if cursor + batch > len(perm):
            perm, cursor = torch.randperm(len(x), generator=g), 0
        idx = perm[cursor : cursor + batch]
        cursor += batch
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return {n: t.detach().clone() for n, t in model.named_parameters()}


def _restore(model: nn.Module, weights: dict) -> None:
    """Copy ``weights`` (parameters by name) back; buffers such as a CDE's path are not
    weights and are rebuilt by every forward."""
    with torch.no_grad():
        for n, t in model.named_parameters():
            t.copy_(weights[n])


def _setup(
    variant: str, args: argparse.Namespace, dims: tuple[int, int], weights: dict
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The bench's model from ``weights`` and the optimizer of ``variant`` (``"armed"``:
    SNOpt refreshing on every step, ``"plain"``: never after its first)."""
    model = build_model(args.model, dims[0], dims[1], "snopt")
    _restore(model, weights)
    key = (args.dataset, args.model)
    name = "adam" if variant == "adam" else "snopt"
    wd = DEFAULT_WEIGHT_DECAYS.get(key, {}).get(name, 0.0)
    options = {**SNOPT_OPTIONS, "update_freq": 1 if variant == "armed" else 10**9}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = make_optimizer(name, model, DEFAULT_LRS[key][name], options, wd)
    return model, opt


def _timed_step(
    model: nn.Module, opt: torch.optim.Optimizer, weights: dict, xb: torch.Tensor, yb: torch.Tensor
) -> float:
    """Seconds of one training step; the weights are restored afterwards."""
    t0 = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(xb), yb).backward()
    opt.step()
    elapsed = time.perf_counter() - t0
    _restore(model, weights)
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="BasicMotions", choices=("BasicMotions", "JapaneseVowels"))
    p.add_argument("--model", default="odernn", choices=("odernn", "ncde"))
    p.add_argument("--warmup-iters", type=int, default=30)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    data, channels, classes = prepare(args.dataset, args.model, torch.device("cpu"))
    batch = BATCH_SIZES[args.dataset]
    torch.manual_seed(0)
    model = build_model(args.model, channels, classes, "snopt")
    lr = DEFAULT_LRS[(args.dataset, args.model)]["adam"]
    weights = _warm_weights(model, data, batch, args.warmup_iters, lr)
    xb, yb = data[0][:batch], data[1][:batch]
    setups = {v: _setup(v, args, (channels, classes), weights) for v in VARIANTS}
    for model, opt in setups.values():  # first step: SNOpt's initial refresh, Adam's state
        _timed_step(model, opt, weights, xb, yb)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.reps):  # interleaved, order rotated: drifts hit every variant alike
        for v in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:
            model, opt = setups[v]
            times[v].append(_timed_step(model, opt, weights, xb, yb))
    t = {v: statistics.median(ts) for v, ts in times.items()}
    k = SNOPT_OPTIONS["update_freq"]
    t["amortized"] = (t["armed"] + (k - 1) * t["plain"]) / k
    print(
        f"{args.dataset} {args.model}, batch {batch}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, median of {args.reps} interleaved repetitions, weights "
        f"after {args.warmup_iters} Adam iterations"
    )
    print(f"{'variant':34s} {'s/iter':>8s} {'× adam':>7s}")
    for label, key in (
        ("adam", "adam"),
        ("snopt, curvature not armed", "plain"),
        ("snopt, armed (refresh)", "armed"),
        (f"snopt, amortized (update_freq={k})", "amortized"),
    ):
        print(f"{label:34s} {t[key]:8.4f} {t[key] / t['adam']:7.2f}")
    result = {"dataset": args.dataset, "model": args.model, "seconds_per_iter": t}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
