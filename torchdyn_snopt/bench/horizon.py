"""``torchdyn-snopt bench horizon``: a fixed horizon vs a learned one (Table 5, Fig. 5/10).

The image model (``bench image``'s) is trained for the same number of epochs, from the same
initial weights and minibatch stream, with the same optimizer (SNOpt by default):

- ``fixed``: ``t1 = 1.0`` throughout (the vanilla run),
- ``baseline``: ``t1`` learned by the first-order rule (Massaroli et al. 2020),
- ``feedback``: ``t1`` learned by the second-order feedback policy (eq. 16).

It prints training wall-clock (evaluations excluded) relative to the fixed run, test accuracy,
the final ``t1`` and when ``t1`` settled (the first update after which it stays within ±10%
of its final value), and plots ``t1`` against iterations (Fig. 10). ``--fixed-t1`` adds runs
at other fixed horizons (Fig. 5: accuracy and training time against ``t1``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from torchdyn_snopt.bench.common import evaluate, format_table
from torchdyn_snopt.bench.image import DEFAULT_LRS, build_model, build_optimizer
from torchdyn_snopt.horizon import FreeHorizon
from torchdyn_snopt.optim import read_nfe

POLICIES: tuple[str, ...] = ("fixed", "baseline", "feedback")
#: FreeHorizon settings of the benchmark, per policy: penalty c = 0.3 and max_t1 = 1.0 (never
#: longer than the fixed run) for both; lr the best settle iteration of a check per policy on
#: digits, seed 0, 60 epochs, weight decay 1e-2 (feedback 0.3/0.5/0.7/1.0: settled at
#: 300/280/never/never; baseline 1.0/1.5/2.0/3.0: 310/280/300/never). At lr = 1 (a
#: full Gauss-Newton step) and at the baseline's 3.0, T flips between two values every update.
HORIZON_OPTIONS: dict[str, dict[str, Any]] = {
    "baseline": {"penalty": 0.3, "lr": 1.5, "update_every": 10, "momentum": 0.9, "max_t1": 1.0},
    "feedback": {"penalty": 0.3, "lr": 0.5, "update_every": 10, "momentum": 0.9, "max_t1": 1.0},
}
#: dopri5 tolerance of the benchmark. At the image bench's 1e-3 the digits ODE takes dopri5's
#: minimum number of steps for every t1 <= 1, so t1 cannot change the cost (Fig. 5's premise
#: is a cost that grows with t1); at 1e-5 the step count grows with t1.
DEFAULT_TOL = 1e-5
DEFAULT_EPOCHS = 60  # 600 iterations on digits; T settles after about 300
DEFAULT_FIXED_T1: tuple[float, ...] = (0.25, 0.5)
#: Weight decay of every run (all parameters, every policy, the fixed runs too). The field is
#: autonomous and linear in its last layer (W, b), so the flow of (W, b) over [0, T] is that
#: of (kW, kb) over [0, T/k]: T·∂L/∂T = ⟨∂L/∂W, W⟩ + ⟨∂L/∂b, b⟩, which vanishes wherever the
#: weights are stationary. Without weight decay Q_T = ∂L/∂T + c·T > 0 there and T drifts down
#: to min_t1 (what the runs without it showed); with decay γ the stationary point has
#: T·∂L/∂T = −γ‖(W, b)‖², i.e. an interior horizon T*² = γ‖(W, b)‖²/c.
DEFAULT_WEIGHT_DECAY = 1e-2
SETTLE_BAND = 0.10  # ±10% of the final t1


@dataclass
class HorizonRun:
    """One (policy, t1, seed) run: time, accuracy, and the t1 trajectory."""

    policy: str
    t1_start: float
    seed: int
    seconds: float = 0.0
    iterations: int = 0
    test_acc: float = float("nan")
    final_t1: float = float("nan")
    settle_iteration: float = float("nan")
    nfe_forward: float = float("nan")
    nfe_backward: float = float("nan")
    #: The interior horizon the trained weights imply, sqrt(γ‖(W, b)‖²/c) for the field's last
    #: layer (see :data:`DEFAULT_WEIGHT_DECAY`); nan for fixed runs and without decay.
    t1_star: float = float("nan")
    epoch_acc: list[float] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)


def settle_iteration(history: Sequence[tuple[int, float]], band: float = SETTLE_BAND) -> float:
    """First iteration after which ``t1`` stays within ``±band`` of its final value."""
    if not history:
        return float("nan")
    final = history[-1][1]
    settled = history[-1][0]
    for it, t in reversed(history):
        if abs(t - final) > band * abs(final):
            break
        settled = it
    return float(settled)


def run_one(
    policy: str,
    t1: float,
    seed: int,
    data: tuple,
    epochs: int,
    optimizer: str,
    lr: float,
    dataset: str,
    batch_size: int,
    device: torch.device,
    horizon_options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    tol: float = 1e-3,
    weight_decay: float = 0.0,
) -> HorizonRun:
    """Train ``epochs`` epochs under one horizon policy; returns its :class:`HorizonRun`.

    ``weight_decay`` (``γ``, every parameter, every policy) is what gives the horizon an
    interior optimum: see :data:`DEFAULT_WEIGHT_DECAY`."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    model = build_model(dataset, tuple(x_train.shape), "snopt", tol=tol, t1=t1).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(optimizer, model, lr, weight_decay=weight_decay)
    horizon = None
    if policy != "fixed":
        opts = {**HORIZON_OPTIONS[policy], **(horizon_options or {})}
        horizon = FreeHorizon(t1=t1, policy=policy, **opts).to(device).attach(model, opt)
    run = HorizonRun(policy, t1, seed)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x_train) // batch_size
    nfe_f = nfe_b = 0
    read_nfe(model)
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            start = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            run.seconds += time.perf_counter() - start
            run.iterations += 1
            n = read_nfe(model)
            nfe_f, nfe_b = nfe_f + n["forward"], nfe_b + n["backward"]
        run.epoch_acc.append(evaluate(model, x_test, y_test)[1])
        read_nfe(model)  # evaluation solves are not training cost
        if progress is not None:
            progress(1)
    run.test_acc = run.epoch_acc[-1]
    run.nfe_forward = nfe_f / max(run.iterations, 1)
    run.nfe_backward = nfe_b / max(run.iterations, 1)
    if horizon is None:
        run.history = [(0, t1), (run.iterations, t1)]
    else:
        run.history = list(horizon.history)
        run.t1_star = _implied_horizon(model, weight_decay, horizon.penalty)
        horizon.detach()
    run.final_t1 = run.history[-1][1]
    run.settle_iteration = settle_iteration(run.history) if horizon is not None else 0.0
    return run


def _implied_horizon(model: torch.nn.Module, weight_decay: float, penalty: float) -> float:
    """``sqrt(γ‖(W, b)‖²/c)`` of the ODE field's last convolution: where ``Q_T = 0`` once the
    weights are stationary (``T·∂L/∂T = −γ‖(W, b)‖²``)."""
    if weight_decay <= 0 or penalty <= 0:
        return float("nan")
    out = [m for m in model.ode.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        norm2 = float(out.weight.square().sum() + out.bias.square().sum())
    return math.sqrt(weight_decay * norm2 / penalty)


def summary_rows(runs: list[HorizonRun]) -> list[dict[str, Any]]:
    """Mean over seeds per (policy, starting t1); time relative to fixed t1 = 1.0."""
    groups: dict[tuple[str, float], list[HorizonRun]] = {}
    for r in runs:
        groups.setdefault((r.policy, r.t1_start), []).append(r)

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else float("nan")

    ref = groups.get(("fixed", 1.0))
    ref_s = mean([r.seconds for r in ref]) if ref else float("nan")
    ref_acc = mean([r.test_acc for r in ref]) if ref else float("nan")
    rows = []
    for (policy, t1), rs in groups.items():
        secs = mean([r.seconds for r in rs])
        acc = mean([r.test_acc for r in rs])
        rows.append(
            {
                "policy": policy,
                "t1_start": t1,
                "seeds": len(rs),
                "train_s": secs,
                "time_vs_fixed1": secs / ref_s if ref_s else float("nan"),
                "test_acc": acc,
                "acc_minus_fixed1": acc - ref_acc,
                "final_t1": mean([r.final_t1 for r in rs]),
                "t1_star": mean([r.t1_star for r in rs]),
                "settle_iter": mean([r.settle_iteration for r in rs]),
                "nfe_forward": mean([r.nfe_forward for r in rs]),
                "nfe_backward": mean([r.nfe_backward for r in rs]),
            }
        )
    return rows


def bench_horizon(
    dataset: str = "digits",
    epochs: int = DEFAULT_EPOCHS,
    seeds: int = 3,
    policies: Sequence[str] = POLICIES,
    fixed_t1: Sequence[float] = DEFAULT_FIXED_T1,
    optimizer: str = "snopt",
    lr: float | None = None,
    device: str = "auto",
    out: str | Path = "runs/horizon",
    batch_size: int = 128,
    quiet: bool = False,
    horizon_options: dict[str, Any] | None = None,
    tol: float = DEFAULT_TOL,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
) -> dict[str, Any]:
    """Run the horizon benchmark; returns ``{"summary": rows, "runs": [...], "files": [...]}``."""
    from torchdyn_snopt.data import IMAGE_DATASETS, load_image_dataset

    if dataset not in IMAGE_DATASETS:
        raise ValueError(f"dataset={dataset!r} is unknown; accepted: {', '.join(IMAGE_DATASETS)}")
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise ValueError(
            f"policies={tuple(policies)!r} is invalid; accepted: a non-empty subset of "
            f"{', '.join(POLICIES)}"
        )
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay={weight_decay!r} is invalid; accepted: a float >= 0")
    if epochs < 1 or seeds < 1:
        raise ValueError(f"epochs={epochs!r}, seeds={seeds!r} are invalid; accepted: ints >= 1")
    if any(not (math.isfinite(t) and t > 0) for t in fixed_t1):
        raise ValueError(f"fixed_t1={tuple(fixed_t1)!r} is invalid; accepted: floats > 0")
    if optimizer not in DEFAULT_LRS[dataset]:
        raise ValueError(
            f"optimizer={optimizer!r} is unknown; accepted: {', '.join(DEFAULT_LRS[dataset])}"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    lr = DEFAULT_LRS[dataset][optimizer] if lr is None else lr
    log = (lambda *a: None) if quiet else print
    data = tuple(t.to(dev) for t in load_image_dataset(dataset))
    plan = [(p, 1.0) for p in policies]
    plan += [("fixed", t) for t in fixed_t1 if ("fixed", t) not in plan]
    log(
        f"{dataset}: {len(data[0])} train / {len(data[2])} test images, {epochs} epochs per run, "
        f"{optimizer} lr={lr:g} weight_decay={weight_decay:g}, {seeds} seed(s), device {dev}"
    )
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan) * seeds * epochs, desc="epochs", leave=False)
    runs: list[HorizonRun] = []
    try:
        for seed in range(seeds):
            for policy, t1 in plan:
                r = run_one(
                    policy,
                    t1,
                    seed,
                    data,
                    epochs,
                    optimizer,
                    lr,
                    dataset,
                    batch_size,
                    dev,
                    horizon_options,
                    progress=None if bar is None else bar.update,
                    tol=tol,
                    weight_decay=weight_decay,
                )
                runs.append(r)
                log(
                    f"  seed {seed} {policy:8s} t1={t1:g}: {r.seconds:.1f} s, acc "
                    f"{r.test_acc:.4f}, final t1 {r.final_t1:.3f}"
                )
    finally:
        if bar is not None:
            bar.close()
    rows = summary_rows(runs)
    used = {p: {**HORIZON_OPTIONS[p], **(horizon_options or {})} for p in policies if p != "fixed"}
    settings = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "tol": tol}
    files = write_outputs(runs, rows, Path(out), dataset, {**settings, "horizon": used})
    log("")
    log(format_table(rows))
    log(f"FreeHorizon options: {used}")
    log("wrote " + ", ".join(str(p) for p in files))
    return {"summary": rows, "runs": runs, "files": files}


def write_outputs(
    runs: list[HorizonRun],
    rows: list[dict[str, Any]],
    out: Path,
    dataset: str,
    settings: dict[str, Any] | None = None,
) -> list[Path]:
    """JSON of everything and a PNG: t1 against iterations (Fig. 10), accuracy/time vs t1 (5)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"horizon_{dataset}.json", out / f"horizon_{dataset}.png"]
    with open(paths[0], "w") as fh:
        doc = {"settings": settings or {}, "summary": rows, "runs": [asdict(r) for r in runs]}
        json.dump(doc, fh, indent=1, default=float)
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = {"fixed": "C0", "baseline": "C1", "feedback": "C2"}
    seen: set[str] = set()
    for r in runs:
        if r.policy == "fixed" and r.t1_start != 1.0:
            continue
        its, ts = zip(*r.history, strict=True)
        label = None if r.policy in seen else r.policy
        seen.add(r.policy)
        ax_t.plot(its, ts, color=colors[r.policy], label=label, alpha=0.8, drawstyle="steps-post")
    ax_t.set_xlabel("iteration")
    ax_t.set_ylabel("t1")
    ax_t.set_title("t1 during training (Fig. 10 analogue)")
    ax_t.legend()
    fixed = sorted((row for row in rows if row["policy"] == "fixed"), key=lambda r: r["t1_start"])
    if fixed:
        t1s = [row["t1_start"] for row in fixed]
        ax_f.plot(t1s, [row["test_acc"] for row in fixed], "o-", color="C0")
        ax_f.set_xlabel("fixed t1")
        ax_f.set_ylabel("test accuracy", color="C0")
        ax_s = ax_f.twinx()
        ax_s.plot(t1s, [row["train_s"] for row in fixed], "s--", color="C3")
        ax_s.set_ylabel("training seconds", color="C3")
        for row in rows:
            if row["policy"] != "fixed":
                ax_f.scatter(
                    [row["final_t1"]],
                    [row["test_acc"]],
                    marker="*",
                    s=120,
                    color=colors[row["policy"]],
                    label=f"{row['policy']} (final t1)",
                )
        if any(row["policy"] != "fixed" for row in rows):
            ax_f.legend(loc="lower right")
        ax_f.set_title("accuracy and time against t1 (Fig. 5 analogue)")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
