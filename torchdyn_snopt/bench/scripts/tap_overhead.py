"""Per-iteration time of SNOpt through ``tds.CurvatureTap`` vs Adam, on plain torchcde code.

The model is what a torchcde user writes: ``torchcde.cdeint(X, func, z0, t, adjoint=True)``
on JapaneseVowels (12 values + time, Hermite cubic path, 9 classes), with ``func`` a
``CDEFunc`` (hidden 32, inner width 64) wrapped in :class:`~torchdyn_snopt.CurvatureTap`, a
linear initial map and a linear head; torchdiffeq's rk4 with one step per observation gap
(as ``bench timeseries`` and tutorial 2 run the CDE), forward and adjoint.
Variants, from the same weights and the same batch of 128, each step timed with the weights
restored afterwards so every repetition integrates the same ODE:

- ``adam``: ``torch.optim.Adam`` (the tap is idle without SNOpt: plain torchcde);
- ``not armed``: ``tds.SNOpt(model)`` between refreshes (``update_freq`` huge);
- ``armed``: ``tds.SNOpt(model, update_freq=1)``: the tap records the adjoint solve and the
  eigenbases are refreshed at every step;
- ``amortized``: ``(armed + (k − 1)·not armed) / k`` at SNOpt's default ``update_freq`` ``k``.

Medians over ``--reps`` interleaved repetitions, one intra-op thread by default. ``--json``
writes the figures with the run's command, machine and versions; ``torchdyn-snopt report``
turns that file into a page (:func:`markdown`) and the README's line on the ``CurvatureTap``
route (:func:`target_line`, target: amortized ≤ :data:`COST_TARGET` × Adam's s/iter).

    python -m torchdyn_snopt.bench.scripts.tap_overhead [--reps 10] [--json F]
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import torchdyn_snopt as tds
from torchdyn_snopt.bench.outputs import write_json
from torchdyn_snopt.bench.provenance import environment, footer
from torchdyn_snopt.bench.records import fmt, md_table
from torchdyn_snopt.bench.suite_report import COST_TARGET
from torchdyn_snopt.data.uea import load_uea
from torchdyn_snopt.models.ncde import CDEFunc, NeuralCDE

#: SNOpt's default refresh period, the ``k`` of the amortized cost.
UPDATE_FREQ: int = inspect.signature(tds.SNOpt).parameters["update_freq"].default
VARIANTS: tuple[str, ...] = ("adam", "not_armed", "armed", "amortized")
#: Rows of the timed batch (drawn with the seed from JapaneseVowels' training series).
BATCH: int = 128


class TapCDE(nn.Module):
    """A torchcde Neural CDE classifier whose ``func`` is wrapped in a CurvatureTap."""

    def __init__(self, channels: int, classes: int, hidden: int, width: int) -> None:
        super().__init__()
        self.initial = nn.Linear(channels, hidden)
        self.func = tds.CurvatureTap(CDEFunc(channels, hidden, width))
        self.head = nn.Linear(hidden, classes)

    def forward(self, coeffs: torch.Tensor) -> torch.Tensor:
        import torchcde

        X = torchcde.CubicSpline(coeffs)
        z0 = self.initial(X.evaluate(X.interval[0]))
        z = torchcde.cdeint(
            X, self.func, z0, X.interval, adjoint=True, method="rk4", options={"step_size": 1.0}
        )
        return self.head(z[:, -1])


def _make(variant: str, weights: dict) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = TapCDE(13, 9, 32, 64)
    model.load_state_dict(weights)
    if variant == "adam":
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)
    freq = 1 if variant == "armed" else 10**9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, tds.SNOpt(model, update_freq=freq)


def _step(model: nn.Module, opt: torch.optim.Optimizer, weights: dict, xb, yb) -> float:
    t0 = time.perf_counter()
    opt.zero_grad()
    F.cross_entropy(model(xb), yb).backward()
    opt.step()
    elapsed = time.perf_counter() - t0
    model.load_state_dict(weights)
    return elapsed


def timing(reps: int, seed: int) -> dict[str, float]:
    """Median seconds per iteration of each variant (see the module docstring)."""
    x, y, _, _ = load_uea("JapaneseVowels")
    coeffs = NeuralCDE(13, 9).coefficients(x)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(coeffs), (BATCH,), generator=g)
    xb, yb = coeffs[idx], y[idx]
    torch.manual_seed(seed)
    weights = TapCDE(13, 9, 32, 64).state_dict()
    setups = {v: _make(v, weights) for v in ("adam", "not_armed", "armed")}
    for model, opt in setups.values():  # first step: SNOpt's first refresh, Adam's state
        _step(model, opt, weights, xb, yb)
    times: dict[str, list[float]] = {v: [] for v in setups}
    for _ in range(reps):  # interleaved so drifts hit every variant alike
        for v, (model, opt) in setups.items():
            times[v].append(_step(model, opt, weights, xb, yb))
    out = {v: statistics.median(ts) for v, ts in times.items()}
    out["amortized"] = (out["armed"] + (UPDATE_FREQ - 1) * out["not_armed"]) / UPDATE_FREQ
    return out


def document(t: dict[str, float], args: dict[str, Any]) -> dict[str, Any]:
    """The JSON of a run: ``summary`` rows (variant, s/iter, × Adam's), the raw
    ``seconds_per_iter``, the settings and :func:`~torchdyn_snopt.bench.provenance.environment`
    with the command that reproduces the run."""
    flags = " ".join(f"--{k} {v}" for k, v in args.items() if k != "json")
    command = f"python -m torchdyn_snopt.bench.scripts.tap_overhead {flags}"
    rows = [{"variant": v, "s_per_iter": t[v], "x_adam": t[v] / t["adam"]} for v in VARIANTS]
    settings = {**args, "update_freq": UPDATE_FREQ, "batch": BATCH, "solver": "rk4, step 1"}
    return {
        "environment": environment(command),
        "tap_overhead": settings,
        "summary": rows,
        "seconds_per_iter": t,
    }


def is_tap_overhead(doc: dict[str, Any]) -> bool:
    """Whether ``doc`` is this script's JSON (:func:`document`)."""
    return "tap_overhead" in doc and "seconds_per_iter" in doc


def target_line(doc: dict[str, Any]) -> str:
    """The README's line on the ``CurvatureTap`` route: amortized s/iter against Adam's."""
    t, s = doc["seconds_per_iter"], doc["tap_overhead"]
    x = t["amortized"] / t["adam"]
    verdict = "met" if x <= COST_TARGET else "missed"
    return (
        f"SNOpt through `CurvatureTap` on plain torchcde code (JapaneseVowels Neural CDE, "
        f"batch {s['batch']}): amortized seconds per iteration {fmt(x)}× Adam's (a refresh "
        f"every {s['update_freq']} steps; target ≤ {COST_TARGET:g}×; {verdict})."
    )


def markdown(doc: dict[str, Any], title: str) -> str:
    """Page of a run: what is timed, the table of :func:`document`'s rows, the target line
    and the run's provenance."""
    s = doc["tap_overhead"]
    lines = [
        title,
        "",
        "Seconds per iteration of a torchcde Neural CDE classifier whose vector field is "
        "wrapped in `tds.CurvatureTap` (JapaneseVowels, Hermite path, rk4 with one step per "
        f"observation gap, adjoint; batch {s['batch']}), each step from the same weights and "
        f"batch; medians over {s['reps']} interleaved repetitions, {s['threads']} thread(s). "
        "`not_armed`: SNOpt between refreshes; `armed`: a refresh at every step (the tap "
        "records the adjoint solve); `amortized`: `(armed + (k − 1)·not_armed) / k` at "
        f"`update_freq` k = {s['update_freq']}.",
        "",
        *md_table(doc["summary"]),
        "",
        target_line(doc),
        "",
        footer(doc["environment"]),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t = timing(args.reps, args.seed)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps}, "
        f"rk4 step 1, batch {BATCH}, amortized at update_freq {UPDATE_FREQ}"
    )
    print(f"{'variant':34s} {'s/iter':>9s} {'x adam':>8s}")
    for name in VARIANTS:
        print(f"{name:34s} {t[name]:9.4f} {t[name] / t['adam']:8.2f}")
    if args.json:
        write_json(Path(args.json), document(t, vars(args)))
    return t


if __name__ == "__main__":
    main()
