"""Equal-wall-clock training runs, their logs, tables, files and plots (shared by benches).

A run trains one model with one optimizer for ``budget_s`` seconds of *training* time
(forward, backward, optimizer step); test evaluations pause the clock. Every optimizer of a
comparison gets the same initial weights (same seed) and the same minibatch stream.
"""

from __future__ import annotations

import csv
import gc
import inspect
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from torchdyn_snopt.bench.provenance import environment
from torchdyn_snopt.optim import SNOpt, read_nfe
from torchdyn_snopt.registration import is_snopt_problem

#: The optimizers every bench compares.
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "snopt")
#: Every name :func:`make_optimizer` builds (``bench suite`` also compares the last two).
KNOWN_OPTIMIZERS: tuple[str, ...] = (*OPTIMIZERS, "soap", "snopt-default")
#: The rate ``snopt-default`` passes while ``SNOpt``'s ``lr`` has no default: the reference
#: rate of the released image experiments (implementation notes: SNOpt 0.01-0.02 on images).
SNOPT_REFERENCE_LR = 0.01
BENCH_EXTRA_HINT = 'pip install "torchdyn-snopt[bench]"'


def snopt_default_lr() -> float | None:
    """``SNOpt``'s default ``lr``; None while it has none (``SNOpt(model)`` fails)."""
    default = inspect.signature(SNOpt).parameters["lr"].default
    return None if default is inspect.Parameter.empty else float(default)


def snopt_lr_has_default() -> bool:
    """Whether ``SNOpt(model)`` works, i.e. its ``lr`` argument has a default."""
    return snopt_default_lr() is not None


def require_soap() -> type[torch.optim.Optimizer]:
    """``pytorch_optimizer.SOAP``; ImportError naming the bench extra when it is missing."""
    try:
        from pytorch_optimizer import SOAP
    except ImportError as err:
        raise ImportError(
            f"the soap optimizer needs pytorch-optimizer: {BENCH_EXTRA_HINT}"
        ) from err
    return SOAP


def make_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    snopt_options: dict[str, Any],
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Adam, SGD (momentum 0.9), SOAP (``pytorch_optimizer``'s defaults otherwise) or
    ``SNOpt(**snopt_options)`` over all of ``model``'s parameters, each with the weight decay
    ``weight_decay`` (default 0): coupled L2 (``γθ`` added to the gradient, so Adam, SGD and
    SNOpt minimise the same regularised loss; SNOpt also adds ``γ`` to its damping, §3.2),
    decoupled for SOAP (its own rule).

    ``snopt-default`` is ``SNOpt(model)`` with nothing else: ``lr`` and ``snopt_options`` are
    ignored, except that while ``SNOpt``'s ``lr`` has no default it gets
    :data:`SNOPT_REFERENCE_LR`; it takes no weight decay (ValueError if ``weight_decay`` is
    not 0).
    """
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "soap":
        return require_soap()(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "snopt":
        return SNOpt(model, lr=lr, weight_decay=weight_decay, **snopt_options)
    if name == "snopt-default":
        if weight_decay:
            raise ValueError(
                f"weight_decay={weight_decay!r} is invalid for snopt-default; accepted: 0"
            )
        return SNOpt(model) if snopt_lr_has_default() else SNOpt(model, lr=SNOPT_REFERENCE_LR)
    raise ValueError(f"optimizer={name!r} is unknown; accepted: {', '.join(KNOWN_OPTIMIZERS)}")


@dataclass
class Point:
    """One logged evaluation: training seconds so far, iterations, losses, accuracy."""

    seconds: float
    iteration: int
    train_loss: float
    test_loss: float
    test_acc: float


@dataclass
class RunResult:
    """Everything one (optimizer, lr, seed) run produced (``error``: the message of the
    exception that ended a failed run, else empty)."""

    optimizer: str
    lr: float
    seed: int
    points: list[Point] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    nfe_forward: float = float("nan")
    nfe_backward: float = float("nan")
    peak_memory_mb: float = float("nan")
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def final_acc(self) -> float:
        return self.points[-1].test_acc if self.points else float("nan")

    @property
    def best_acc(self) -> float:
        return max((p.test_acc for p in self.points), default=float("nan"))

    @property
    def final_train_loss(self) -> float:
        return self.points[-1].train_loss if self.points else float("nan")

    @property
    def seconds_per_iter(self) -> float:
        return self.seconds / max(self.iterations, 1)

    def time_to(self, acc: float) -> float:
        """Training seconds at the first evaluation with test accuracy ``>= acc`` (inf: never)."""
        return next((p.seconds for p in self.points if p.test_acc >= acc), math.inf)


def _nfe_of(model: nn.Module) -> tuple[int, int] | None:
    """(forward, backward) evaluations since the last read, or None if not countable."""
    if any(is_snopt_problem(m) for m in model.modules()):
        n = read_nfe(model)
        return n["forward"], n["backward"]
    return None


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        loss += F.cross_entropy(out, y[i : i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + batch]).sum().item()
    model.train(was_training)
    return loss / len(x), correct / len(x)


def check_run_args(
    optimizers: tuple[str, ...], accepted: tuple[str, ...], budget_s: float, seeds: int
) -> None:
    """ValueError unless ``optimizers`` is a non-empty subset of ``accepted``, ``budget_s`` a
    finite float > 0 and ``seeds`` an int >= 1 (the arguments every equal-budget bench takes)."""
    bad = [o for o in optimizers if o not in accepted]
    if bad or not optimizers:
        raise ValueError(
            f"optimizers={optimizers!r} is invalid; accepted: a non-empty subset "
            f"of {', '.join(accepted)}"
        )
    if not (math.isfinite(budget_s) and budget_s > 0):
        raise ValueError(f"budget_s={budget_s!r} is invalid; accepted: a float > 0")
    if seeds < 1:
        raise ValueError(f"seeds={seeds!r} is invalid; accepted: an int >= 1")


def train_for(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    budget_s: float,
    *,
    name: str,
    lr: float,
    seed: int,
    batch_size: int = 128,
    n_evals: int = 30,
    progress: Callable[[float], None] | None = None,
    before_step: Callable[[Tensor, Tensor], None] | None = None,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
    eval_fn: Callable[[nn.Module, Tensor, Tensor], tuple[float, float]] | None = None,
    max_nfe: int | None = None,
    catch_failures: bool = False,
    train_eval_fn: Callable[[nn.Module], float] | None = None,
    batch_seed: int | None = None,
    keep_partial: bool = False,
) -> RunResult:
    """Train for ``budget_s`` seconds of training time; evaluate ``n_evals`` times evenly.

    ``before_step(x, y)`` (timed) sees the minibatch after ``backward()`` and before
    ``optimizer.step()``: optimizers that need the batch again (Newton-CG) take it there.
    ``loss_fn(model, x, y)`` is the training loss (default: cross-entropy of ``model(x)``);
    ``eval_fn(model, x_test, y_test)`` returns ``(test_loss, test_acc)`` (default:
    :func:`evaluate`; a density model returns its test NLL and NaN).
    ``train_eval_fn(model)``: when given, the logged training loss is its value (e.g. the
    loss on the whole training set, untimed) instead of the mean minibatch loss since the
    previous evaluation, and a first point is logged at 0 s before any step.
    ``batch_seed``: seed of the minibatch order (default ``seed``).
    ``max_nfe``: a run whose forward solve of one iteration takes more field evaluations than
    this has made its ODE too stiff to train in any budget; it is evaluated once more and
    stopped with ``extra["stalled"] = 1`` (default None: never stop). A non-finite minibatch
    loss is evaluated at once and ends the run with ``extra["diverged"] = 1``.
    ``catch_failures``: a RuntimeError during training (the ODE solve failed) ends the run
    with a warning, no points and ``extra["diverged"] = 1`` instead of propagating;
    ``keep_partial`` (with it) keeps instead, without a warning, what the run had logged and
    counted until then, with the message in ``error``.
    """
    if loss_fn is None:
        loss_fn = _cross_entropy
    if eval_fn is None:
        eval_fn = evaluate
    x_train, y_train, x_test, y_test = data
    result = RunResult(name, lr, seed)
    g = torch.Generator().manual_seed(seed if batch_seed is None else batch_seed)
    perm, cursor = torch.randperm(len(x_train), generator=g), 0
    next_eval, spent, window = budget_s / n_evals, 0.0, []
    nfe = [0, 0]

    def log_point() -> float:
        test_loss, acc = eval_fn(model, x_test, y_test)
        if train_eval_fn is not None:
            train_loss = train_eval_fn(model)
        else:
            train_loss = sum(window) / len(window) if window else float("nan")
        _nfe_of(model)  # the evaluations' solves are not the next iteration's
        result.points.append(Point(spent, result.iterations, train_loss, test_loss, acc))
        return train_loss

    def finish() -> RunResult:
        result.seconds = spent
        if result.iterations and nfe[0]:
            result.nfe_forward = nfe[0] / result.iterations
            result.nfe_backward = nfe[1] / result.iterations
        return result

    _nfe_of(model)  # reset counters
    try:
        if train_eval_fn is not None:
            log_point()
        while spent < budget_s:
            if cursor + batch_size > len(perm):
                perm, cursor = torch.randperm(len(x_train), generator=g), 0
            idx = perm[cursor : cursor + batch_size]
            cursor += batch_size
            start = time.perf_counter()
            optimizer.zero_grad()
            loss = loss_fn(model, x_train[idx], y_train[idx])
            loss.backward()
            if before_step is not None:
                before_step(x_train[idx], y_train[idx])
            optimizer.step()
            spent += time.perf_counter() - start
            result.iterations += 1
            window.append(loss.item())
            counts = _nfe_of(model)
            if counts is not None:
                nfe[0], nfe[1] = nfe[0] + counts[0], nfe[1] + counts[1]
            stalled = max_nfe is not None and counts is not None and counts[0] > max_nfe
            if stalled:
                result.extra["stalled"] = 1.0
            blown = not math.isfinite(window[-1])
            if blown:
                result.extra["diverged"] = 1.0
            if progress is not None:
                progress(min(spent, budget_s))
            if spent >= next_eval or spent >= budget_s or stalled or blown:
                train_loss = log_point()
                window, next_eval = [], next_eval + budget_s / n_evals
                if not math.isfinite(train_loss) or stalled or blown:
                    break
    except RuntimeError as err:  # the solver gave up: step size underflow, NLL blow-up, ...
        if not catch_failures:
            raise
        if keep_partial:
            result.extra["diverged"], result.error = 1.0, str(err)
            return finish()
        warnings.warn(f"{name} lr={lr:g} seed {seed} diverged: {err}", stacklevel=2)
        return RunResult(name, lr, seed, extra={"diverged": 1.0})
    return finish()


def _heap_in_use() -> Callable[[], int] | None:
    """Bytes the C heap has handed out and not freed (glibc ``mallinfo2``: all arenas, mmapped
    blocks included), i.e. live CPU tensor memory without the allocator's cached free pages."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class _MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return in_use


def peak_memory_mb(step: Callable[[], None], model: nn.Module, device: torch.device) -> float:
    """Peak memory above the starting level during ``step()`` (max over 2 calls after a warm-up).

    CUDA: the allocator's peak statistics. CPU: live heap bytes (glibc ``mallinfo2``) sampled at
    every module call (every RK stage of every solve) and after each step; NaN where unavailable.
    """
    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(2):
            step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    in_use = _heap_in_use()
    if in_use is None:
        return float("nan")
    peak = [0]

    def sample(*_: Any) -> None:
        peak[0] = max(peak[0], in_use())

    handles = [m.register_forward_hook(sample) for m in model.modules()]
    try:
        step()  # warm-up: optimizer state, lazily created buffers
        gc.collect()
        base = in_use()
        peak[0] = base
        for _ in range(2):
            step()
            sample()
    finally:
        for h in handles:
            h.remove()
    return (peak[0] - base) / 2**20


# --------------------------------------------------------------------------- reporting


#: Per-run flags in ``RunResult.extra`` (1 = happened); their summary is the fraction of seeds.
_FLAGS = ("stalled", "diverged")


def summary_rows(
    runs: list[RunResult],
    references: tuple[str, ...] = ("adam", "sgd"),
) -> list[dict[str, Any]]:
    """Mean over seeds per optimizer.

    For each reference optimizer present (Adam, SGD), ``s_to_<ref>_best`` is the mean training
    time until a run first reaches that seed's best test accuracy of the reference (``inf``
    if some seed never does) and ``x_<ref>_time`` its ratio to the reference's own time.
    """
    by_opt: dict[str, list[RunResult]] = {}
    for r in runs:
        by_opt.setdefault(r.optimizer, []).append(r)

    def mean(v: list[float]) -> float:
        return sum(v) / len(v) if v else float("nan")

    rows = []
    for name, rs in by_opt.items():
        row: dict[str, Any] = {
            "optimizer": name,
            "lr": rs[0].lr,
            "seeds": len(rs),
            "final_acc": mean([r.final_acc for r in rs]),
            "best_acc": mean([r.best_acc for r in rs]),
            "final_train_loss": mean([r.final_train_loss for r in rs]),
        }
        for ref in (r for r in references if r in by_opt):
            best = {r.seed: r.best_acc for r in by_opt[ref]}
            own = mean([r.time_to(r.best_acc) for r in by_opt[ref]])
            times = mean([r.time_to(best[r.seed]) for r in rs if r.seed in best])
            row[f"s_to_{ref}_best"] = times
            row[f"x_{ref}_time"] = times / own if own else math.nan
        row.update(
            {
                "s_per_iter": mean([r.seconds_per_iter for r in rs]),
                "iterations": mean([float(r.iterations) for r in rs]),
                "nfe_forward": mean([r.nfe_forward for r in rs]),
                "nfe_backward": mean([r.nfe_backward for r in rs]),
                "peak_memory_mb": mean([r.peak_memory_mb for r in rs]),
                **{
                    k: mean([r.extra.get(k, 0.0 if k in _FLAGS else math.nan) for r in rs])
                    for k in dict.fromkeys(k for r in rs for k in r.extra)
                },
            }
        )
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned plain-text table of :func:`summary_rows`."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[_fmt(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "never"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def write_outputs(
    runs: list[RunResult],
    rows: list[dict[str, Any]],
    out: Path,
    stem: str,
    title: str,
    right: tuple[str, str] = ("test_acc", "test accuracy"),
) -> list[Path]:
    """JSON (everything), CSV (every logged point) and a PNG of the curves under ``out``;
    ``right`` is the :class:`Point` field and label of the plot's right panel."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.csv", out / f"{stem}.png"]
    with open(paths[0], "w") as fh:
        doc = {"environment": environment(), "summary": rows, "runs": [asdict(r) for r in runs]}
        json.dump(doc, fh, indent=1, default=float)
    with open(paths[1], "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["optimizer", "lr", "seed", *Point.__dataclass_fields__])
        for r in runs:
            for p in r.points:
                w.writerow([r.optimizer, r.lr, r.seed, *asdict(p).values()])
    plot_curves(runs, paths[2], title, right)
    return paths


def plot_curves(
    runs: list[RunResult],
    path: Path,
    title: str,
    right: tuple[str, str] = ("test_acc", "test accuracy"),
) -> None:
    """Training loss and ``right`` (default test accuracy) against training wall-clock
    (Fig. 1/7 analogue). The loss axis is logarithmic when every loss is positive."""
    key, label = right
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors: dict[str, str] = {}
    for r in runs:
        c = colors.setdefault(r.optimizer, f"C{len(colors)}")
        t = [p.seconds for p in r.points]
        legend = f"{r.optimizer} (lr {r.lr:g})" if r.seed == min(x.seed for x in runs) else None
        ax_l.plot(t, [p.train_loss for p in r.points], color=c, label=legend, alpha=0.85)
        ax_a.plot(t, [getattr(p, key) for p in r.points], color=c, label=legend, alpha=0.85)
    if all(p.train_loss > 0 for r in runs for p in r.points):
        ax_l.set_yscale("log")
    ax_l.set_xlabel("training wall-clock (s)")
    ax_l.set_ylabel("training loss")
    ax_a.set_xlabel("training wall-clock (s)")
    ax_a.set_ylabel(label)
    accs = [p.test_acc for r in runs for p in r.points]
    if key == "test_acc" and accs:
        ax_a.set_ylim(max(0.0, sorted(accs)[len(accs) // 10] - 0.05), 1.0)
    ax_a.legend(loc="lower right" if key == "test_acc" else "upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def with_bar(
    desc: str,
    budget_s: float,
    quiet: bool,
    run: Callable[[Callable[[float], None] | None], RunResult],
) -> RunResult:
    """Call ``run(progress)`` under a tqdm bar of the training seconds (none when quiet)."""
    if quiet:
        return run(None)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=round(budget_s, 1),
        desc=desc,
        unit="s",
        leave=False,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s",
    )
    try:
        return run(lambda spent: bar.update(round(spent, 1) - bar.n))
    finally:
        bar.close()


def run_grid(
    grid: list[tuple[str, float, dict[str, Any]]],
    run: Callable[..., RunResult],
    budget_s: float,
    quiet: bool,
    log: Callable[[str], None],
) -> list[RunResult]:
    """Seed 0 of every ``(optimizer, lr, options)`` setting of a sweep, one after another:
    ``run(name, lr, 0, progress=..., measure=False, **options)`` under a progress bar, one
    logged line per setting (options that are None are left out of the labels)."""
    runs = []
    for name, lr, options in grid:
        label = "".join(f" {k}={v:g}" for k, v in options.items() if v is not None)
        r = with_bar(
            f"{name} lr={lr:g}{label}",
            budget_s,
            quiet,
            lambda p, n=name, lr=lr, o=options: run(n, lr, 0, progress=p, measure=False, **o),
        )
        runs.append(r)
        log(
            f"  {name:5s} lr={lr:<7g}{label} final acc {r.final_acc:.4f}  best {r.best_acc:.4f}"
            f"  train loss {r.final_train_loss:.4g}"
        )
    return runs
