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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from torchdyn_snopt.bench import image
from torchdyn_snopt.bench.image import DEFAULT_LRS
from torchdyn_snopt.bench.outputs import write_json
from torchdyn_snopt.bench.records import RunResult, mean
from torchdyn_snopt.bench.session import Session, check_choice
from torchdyn_snopt.bench.trial import Trial
from torchdyn_snopt.horizon import FreeHorizon

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


def horizon_trial(
    policy: str,
    t1: float,
    seed: int,
    dataset: str,
    epochs: int,
    steps_per_epoch: int,
    optimizer: str,
    lr: float,
    batch_size: int = 128,
    tol: float = 1e-3,
    weight_decay: float = 0.0,
) -> Trial:
    """The :class:`Trial` of one (policy, starting t1, seed) run: the image task with horizon
    ``t1`` and dopri5 tolerance ``tol``, ``epochs`` epochs (``steps_per_epoch`` minibatches
    each, the remainder dropped) with a test evaluation after each."""
    return Trial(
        image.task(dataset, batch_size, tol=tol, t1=t1),
        optimizer,
        lr,
        seed,
        math.inf,
        weight_decay=weight_decay,
        max_iterations=epochs * steps_per_epoch,
        eval_every=steps_per_epoch,
        tag=f" {policy} t1={t1:g}",
    )


class _Policy:
    """The setup and after hooks of one policy's runs: attach a :class:`FreeHorizon` (none
    for ``fixed``) and turn each :class:`RunResult` into a :class:`HorizonRun`."""

    def __init__(self, policy: str, t1: float, options: dict[str, Any], device: torch.device):
        self.policy, self.t1, self.options, self.device = policy, t1, options, device
        self.horizon: FreeHorizon | None = None
        self.runs: list[HorizonRun] = []

    def setup(self, trial: Trial, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self.horizon = None
        if self.policy != "fixed":
            h = FreeHorizon(t1=self.t1, policy=self.policy, **self.options)
            self.horizon = h.to(self.device).attach(model, opt)

    def after(self, trial: Trial, model: torch.nn.Module, _: object, r: RunResult) -> None:
        run = HorizonRun(self.policy, self.t1, trial.seed, seconds=r.seconds)
        run.iterations = r.iterations
        run.epoch_acc = [p.test_acc for p in r.points]
        run.test_acc = run.epoch_acc[-1] if run.epoch_acc else float("nan")
        run.nfe_forward, run.nfe_backward = r.nfe_forward, r.nfe_backward
        if self.horizon is None:
            run.history = [(0, self.t1), (run.iterations, self.t1)]
            run.settle_iteration = 0.0
        else:
            run.history = list(self.horizon.history)
            run.t1_star = _implied_horizon(model, trial.weight_decay, self.horizon.penalty)
            run.settle_iteration = settle_iteration(run.history)
            self.horizon.detach()
        run.final_t1 = run.history[-1][1]
        self.runs.append(run)


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
    """Run the horizon benchmark; returns ``{"summary": rows, "runs": [...], "files": [...]}``.

    ``weight_decay`` (``γ``, every parameter, every policy) is what gives the horizon an
    interior optimum: see :data:`DEFAULT_WEIGHT_DECAY`."""
    from torchdyn_snopt.data import IMAGE_DATASETS

    check_choice("dataset", dataset, IMAGE_DATASETS)
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
    check_choice("optimizer", optimizer, tuple(DEFAULT_LRS[dataset]))
    session = Session.open(device, out, quiet)
    lr = DEFAULT_LRS[dataset][optimizer] if lr is None else lr
    data = session.to_device(image.task(dataset).load())
    plan = [(p, 1.0) for p in policies]
    plan += [("fixed", t) for t in fixed_t1 if ("fixed", t) not in plan]
    session.report(
        f"{dataset}: {len(data[0])} train / {len(data[2])} test images, {epochs} epochs per run, "
        f"{optimizer} lr={lr:g} weight_decay={weight_decay:g}, {seeds} seed(s), "
        f"device {session.device}"
    )
    used = {p: {**HORIZON_OPTIONS[p], **(horizon_options or {})} for p in policies if p != "fixed"}
    steps = len(data[0]) // batch_size
    hooks = {(p, t): _Policy(p, t, used.get(p, {}), session.device) for p, t in plan}
    runs: list[HorizonRun] = []
    for seed in range(seeds):
        for policy, t1 in plan:
            hook = hooks[(policy, t1)]
            trial = horizon_trial(policy, t1, seed, dataset, epochs, steps, optimizer, lr,
                                  batch_size, tol, weight_decay)  # fmt: skip
            session.run([trial], data, setup=hook.setup, after=hook.after, line=_line(hook))
            runs.append(hook.runs[-1])
    rows = summary_rows(runs)
    settings = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "tol": tol}
    files = write_outputs(runs, rows, session.out, dataset, {**settings, "horizon": used})
    session.finish(rows, files, f"FreeHorizon options: {used}")
    return {"summary": rows, "runs": runs, "files": files}


def _line(hook: _Policy) -> Any:
    def line(trial: Trial, _: RunResult) -> str:
        r = hook.runs[-1]
        return (
            f"  seed {trial.seed} {r.policy:8s} t1={r.t1_start:g}: {r.seconds:.1f} s, acc "
            f"{r.test_acc:.4f}, final t1 {r.final_t1:.3f}"
        )

    return line


def write_outputs(
    runs: list[HorizonRun],
    rows: list[dict[str, Any]],
    out: Path,
    dataset: str,
    settings: dict[str, Any] | None = None,
) -> list[Path]:
    """JSON of everything and a PNG: t1 against iterations (Fig. 10), accuracy/time vs t1 (5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = {"settings": settings or {}, "summary": rows, "runs": [asdict(r) for r in runs]}
    paths = [write_json(out / f"horizon_{dataset}.json", doc), out / f"horizon_{dataset}.png"]
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
