"""The equal-budget training loop every bench run goes through, and test evaluation.

A run trains one model with one optimizer for ``budget_s`` seconds of *training* time
(forward, backward, optimizer step) or for ``max_iterations`` iterations; evaluations pause
the clock. Every optimizer of a comparison gets the same initial weights (same seed) and the
same minibatch stream (a generator seeded per run).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from torchdyn_snopt.bench.records import Point, RunResult
from torchdyn_snopt.optim import read_nfe
from torchdyn_snopt.registration import is_snopt_problem

#: ``(x_train, y_train, x_test, y_test)``; the first dimension of each tensor indexes examples.
Data = tuple[Tensor, Tensor, Tensor, Tensor]
#: ``loss(model, x, y)``: a scalar training loss of one minibatch.
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
#: ``evaluate(model, x_test, y_test)``: ``(test loss, test accuracy)`` (NaN where undefined).
EvalFn = Callable[[nn.Module, Tensor, Tensor], tuple[float, float]]


def _nfe_of(model: nn.Module) -> tuple[int, int] | None:
    """(forward, backward) evaluations since the last read, or None if not countable."""
    if any(is_snopt_problem(m) for m in model.modules()):
        n = read_nfe(model)
        return n["forward"], n["backward"]
    return None


#: A single solve (training or evaluation) of a run with ``max_nfe`` may take at most this many
#: times ``max_nfe`` field evaluations before the run is stopped as stalled.
SOLVE_CAP_FACTOR = 5


class SolveCapExceeded(RuntimeError):
    """One solve took more field evaluations than its cap: the weights made the ODE so stiff
    that an adaptive solver would not finish in any useful time."""


def cap_of(max_nfe: int | None) -> int | None:
    """The field evaluations one solve may take in a run with ``max_nfe`` (None: no cap)."""
    return None if max_nfe is None else SOLVE_CAP_FACTOR * max_nfe


@contextlib.contextmanager
def solve_cap(model: nn.Module, limit: int | None) -> Iterator[None]:
    """Within the block, a solve of one of ``model``'s snopt problems (its forward call and
    the field evaluations until the next one) raises :class:`SolveCapExceeded` once it has
    evaluated its field more than ``limit`` times (None: no cap). Hooks are removed after."""
    problems = [m for m in model.modules() if is_snopt_problem(m)]
    if limit is None or not problems:
        yield
        return
    count = [0]

    def reset(module: nn.Module, args: Any) -> None:
        count[0] = 0

    def tick(module: nn.Module, args: Any) -> None:
        count[0] += 1
        if count[0] > limit:
            raise SolveCapExceeded(
                f"a solve took more than {limit} field evaluations (the weights made the "
                "ODE too stiff to solve)"
            )

    handles = []
    for problem in problems:
        handles.append(problem.register_forward_pre_hook(reset))
        handles.append(problem.vf.register_forward_pre_hook(tick))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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


def is_failure(err: Exception, model: nn.Module) -> bool:
    """Whether ``err``, raised while training or evaluating ``model``, means the run diverged:
    any RuntimeError (the solver gave up), or a ValueError once a weight is non-finite (a
    solve then refuses the state those weights produce); other errors are bugs to raise."""
    if isinstance(err, RuntimeError):
        return True
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return isinstance(err, ValueError) and not finite


def train_for(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Data,
    budget_s: float,
    *,
    name: str,
    lr: float,
    seed: int,
    batch_size: int = 128,
    n_evals: int = 30,
    progress: Callable[[float], None] | None = None,
    before_step: Callable[[Tensor, Tensor], None] | None = None,
    loss_fn: LossFn | None = None,
    eval_fn: EvalFn | None = None,
    max_nfe: int | None = None,
    catch_failures: bool = False,
    train_eval_fn: Callable[[nn.Module], float] | None = None,
    batch_seed: int | None = None,
    keep_partial: bool = False,
    max_iterations: int | None = None,
    eval_every: int | None = None,
) -> RunResult:
    """Train for ``budget_s`` seconds of training time; evaluate ``n_evals`` times evenly.

    ``before_step(x, y)`` (timed) sees the minibatch after ``backward()`` and before
    ``optimizer.step()``: optimizers that need the batch again (Newton-CG) take it there.
    ``loss_fn(model, x, y)`` is the training loss (default: cross-entropy of ``model(x)``);
    ``eval_fn(model, x_test, y_test)`` returns ``(test_loss, test_acc)`` (default:
    :func:`evaluate`; a density model returns its test NLL and NaN).
    ``train_eval_fn(model)``: when given, the logged training loss is its value (e.g. the
    loss on the whole training set, untimed) instead of the mean minibatch loss since the
    previous evaluation (kept as ``window_loss``), and a first point is logged at 0 s before
    any step.
    ``batch_seed``: seed of the minibatch order (default ``seed``). The order is a fresh
    permutation whenever fewer than ``batch_size`` examples are left (so epochs drop the
    remainder).
    ``max_iterations``: stop after this many iterations too (``budget_s`` may then be inf);
    ``eval_every``: also evaluate after every this many iterations. ``progress`` receives the
    training seconds so far, or the iterations when ``max_iterations`` is given.
    ``max_nfe``: a run whose forward solve of one iteration takes more field evaluations than
    this has made its ODE too stiff to train in any budget; it is evaluated once more and
    stopped with ``extra["stalled"] = 1`` (default None: never stop). Any one solve, in
    training or evaluation, that takes more than ``SOLVE_CAP_FACTOR * max_nfe`` evaluations
    ends the run at once the same way, with the points logged until then (without the cap
    a solve on exploded weights can run for hours). A non-finite minibatch
    loss is evaluated at once and ends the run with ``extra["diverged"] = 1``.
    ``catch_failures``: a RuntimeError during training (the ODE solve failed), or a
    ValueError once the weights are non-finite (the snopt sensitivity refuses a non-finite
    state), ends the run with a warning, no points and ``extra["diverged"] = 1`` instead of
    propagating;
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
    next_eval, spent = budget_s / n_evals, 0.0
    window: list[float] = []
    nfe = [0, 0]

    def done() -> bool:
        over = max_iterations is not None and result.iterations >= max_iterations
        return spent >= budget_s or over

    def log_point() -> float:
        test_loss, acc = eval_fn(model, x_test, y_test)
        window_loss = sum(window) / len(window) if window else math.nan
        train_loss = window_loss if train_eval_fn is None else train_eval_fn(model)
        _nfe_of(model)  # the evaluations' solves are not the next iteration's
        result.points.append(
            Point(spent, result.iterations, train_loss, test_loss, acc, window_loss)
        )
        return train_loss

    def finish() -> RunResult:
        result.seconds = spent
        if result.iterations and nfe[0]:
            result.nfe_forward = nfe[0] / result.iterations
            result.nfe_backward = nfe[1] / result.iterations
        return result

    _nfe_of(model)  # reset counters
    try:
        with solve_cap(model, cap_of(max_nfe)):
            if train_eval_fn is not None:
                log_point()
            while not done():
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
                    progress(result.iterations if max_iterations else min(spent, budget_s))
                periodic = eval_every is not None and result.iterations % eval_every == 0
                if spent >= next_eval or periodic or done() or stalled or blown:
                    train_loss = log_point()
                    window = []
                    if spent >= next_eval:
                        next_eval += budget_s / n_evals
                    if not math.isfinite(train_loss) or stalled or blown:
                        break
    except SolveCapExceeded as err:
        result.extra["stalled"], result.error = 1.0, str(err)
        return finish()
    except (RuntimeError, ValueError) as err:
        # RuntimeError: the solver gave up (step size underflow, NLL blow-up, ...); ValueError:
        # a step left non-finite weights and the next solve refused the state they produced
        if not catch_failures or not is_failure(err, model):
            raise
        if keep_partial:
            result.extra["diverged"], result.error = 1.0, str(err)
            return finish()
        warnings.warn(f"{name} lr={lr:g} seed {seed} diverged: {err}", stacklevel=2)
        return RunResult(name, lr, seed, extra={"diverged": 1.0})
    return finish()
