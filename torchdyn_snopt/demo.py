"""Adam vs. SNOpt on scikit-learn's 8×8 digits with the paper's conv Neural-ODE classifier.

Both runs start from the same initial weights and see the same minibatch sequence for the same
number of iterations; only the optimizer (and with it the backward algorithm) differs:

* Adam on a model built with ``sensitivity="adjoint"`` (torchdyn's own adjoint);
* :class:`~torchdyn_snopt.SNOpt` on a model built with ``sensitivity="snopt"``.

Wall-clock counts training iterations only (forward, backward, optimizer step); the test-set
evaluations every :data:`EVAL_EVERY` iterations are timed separately and excluded. "Time to
97%" is the training wall-clock at the first evaluation reaching :data:`TARGET_ACCURACY`, so
its resolution is one evaluation interval.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from torchdyn_snopt.data import load_digits
from torchdyn_snopt.models import ImageClassifier
from torchdyn_snopt.optim import SNOpt

DEFAULT_LR_SNOPT = 2e-2
SNOPT_OPTIONS: dict[str, Any] = {}  # SNOpt at its defaults
DEFAULT_LR_ADAM = 3e-3
DEFAULT_ITERATIONS = 300
DEFAULT_BATCH_SIZE = 128
EVAL_EVERY = 25
TARGET_ACCURACY = 0.97
LOSS_WINDOW = 20

OPTIMIZERS: tuple[str, ...] = ("adam", "snopt")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= 1")


def _check_lr(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is invalid; accepted: a finite float > 0")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r} is invalid; accepted: a finite float > 0")


def minibatch_indices(n: int, batch_size: int, iterations: int, seed: int) -> list[Tensor]:
    """``iterations`` index batches: a fresh permutation each epoch, incomplete tail dropped."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = n // batch_size
    batches: list[Tensor] = []
    while len(batches) < iterations:
        perm = torch.randperm(n, generator=g)
        batches.extend(perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch))
    return batches[:iterations]


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y`` (model put in eval mode, then restored)."""
    was_training = model.training
    model.eval()
    try:
        return (model(x).argmax(dim=1) == y).float().mean().item()
    finally:
        model.train(was_training)


def _train(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr: float,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    batches: list[Tensor],
    log: Callable[[str], None],
) -> dict[str, Any]:
    x_train, y_train, x_test, y_test = data
    iterations = len(batches)
    losses: list[float] = []
    history: list[dict[str, float]] = []
    train_s = 0.0
    time_to_target: float | None = None
    model.train()
    for it, idx in enumerate(batches, start=1):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        optimizer.step()
        train_s += time.perf_counter() - start
        losses.append(loss.item())
        if it % EVAL_EVERY == 0 or it == iterations:
            acc = accuracy(model, x_test, y_test)
            history.append({"iteration": it, "wall_clock_s": train_s, "test_accuracy": acc})
            if time_to_target is None and acc >= TARGET_ACCURACY:
                time_to_target = train_s
            window = losses[-LOSS_WINDOW:]
            log(
                f"  {name:<5} it {it:>5}/{iterations}  {train_s:8.1f} s  "
                f"loss {sum(window) / len(window):.4f}  test acc {acc:.4f}"
            )
    window = losses[-LOSS_WINDOW:]
    return {
        "optimizer": name,
        "lr": lr,
        "iterations": iterations,
        "wall_clock_s": train_s,
        "s_per_iter": train_s / iterations,
        "final_train_loss": sum(window) / len(window),
        "final_test_accuracy": history[-1]["test_accuracy"],
        "time_to_target_s": time_to_target,
        "target_accuracy": TARGET_ACCURACY,
        "losses": losses,
        "history": history,
    }


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The summary table of :func:`run_demo`'s results as aligned text."""
    header = (
        "optimizer",
        "lr",
        "iterations",
        "wall-clock s",
        "s/iter",
        f"train loss (last {LOSS_WINDOW})",
        "test acc",
        f"s to {TARGET_ACCURACY:.0%} test acc",
    )
    rows = [header]
    for r in results.values():
        t = r["time_to_target_s"]
        rows.append(
            (
                r["optimizer"],
                f"{r['lr']:g}",
                str(r["iterations"]),
                f"{r['wall_clock_s']:.1f}",
                f"{r['s_per_iter']:.3f}",
                f"{r['final_train_loss']:.4f}",
                f"{r['final_test_accuracy']:.4f}",
                "-" if t is None else f"{t:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(
    iterations: int = DEFAULT_ITERATIONS,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr_snopt: float = DEFAULT_LR_SNOPT,
    lr_adam: float = DEFAULT_LR_ADAM,
    quiet: bool = False,
) -> dict[str, dict[str, Any]]:
    """Train the digits classifier with Adam and with SNOpt and compare them.

    ``seed`` fixes the data split, the initial weights (shared by both runs) and the minibatch
    sequence (shared too). The global torch RNG state is restored on return.

    Returns ``{"adam": result, "snopt": result}``; each ``result`` holds ``optimizer``, ``lr``,
    ``iterations``, ``wall_clock_s``, ``s_per_iter``, ``final_train_loss`` (mean of the last
    :data:`LOSS_WINDOW` minibatch losses), ``final_test_accuracy``, ``time_to_target_s``
    (training seconds to the first evaluation at ``>= TARGET_ACCURACY``, or ``None``),
    ``target_accuracy``, ``losses`` (every minibatch loss) and ``history`` (one
    ``{"iteration", "wall_clock_s", "test_accuracy"}`` per evaluation).
    """
    _check_positive_int("iterations", iterations)
    _check_positive_int("batch_size", batch_size)
    _check_lr("lr_snopt", lr_snopt)
    _check_lr("lr_adam", lr_adam)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} is invalid; accepted: an int")

    def log(line: str) -> None:
        if not quiet:
            print(line, flush=True)

    data = load_digits(seed=seed)
    n_train = len(data[0])
    if batch_size > n_train:
        raise ValueError(
            f"batch_size={batch_size} is invalid; accepted: an int in [1, {n_train}] "
            "(the training split's size)"
        )
    batches = minibatch_indices(n_train, batch_size, iterations, seed)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adam_model = ImageClassifier(sensitivity="adjoint")
        snopt_model = ImageClassifier(sensitivity="snopt")
    snopt_model.load_state_dict(copy.deepcopy(adam_model.state_dict()))

    log(
        f"digits: {n_train} train / {len(data[2])} test images, batch {batch_size}, "
        f"{iterations} iterations, seed {seed}; test accuracy every {EVAL_EVERY} iterations"
    )
    results: dict[str, dict[str, Any]] = {}
    log("adam (sensitivity='adjoint')")
    adam = torch.optim.Adam(adam_model.parameters(), lr=lr_adam)
    results["adam"] = _train("adam", adam_model, adam, lr_adam, data, batches, log)
    log("snopt (sensitivity='snopt')")
    snopt = SNOpt(snopt_model, lr=lr_snopt, **SNOPT_OPTIONS)
    results["snopt"] = _train("snopt", snopt_model, snopt, lr_snopt, data, batches, log)
    log("")
    log(format_table(results))
    return results
