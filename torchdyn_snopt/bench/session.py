"""What every bench command shares: its device, reporter and output folder, the argument
checks of a comparison, and running a list of :class:`~torchdyn_snopt.bench.trial.Trial`
one after another under progress bars, one printed line each."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from torchdyn_snopt.bench.loop import Data
from torchdyn_snopt.bench.records import RunResult
from torchdyn_snopt.bench.reporter import Progress, Reporter
from torchdyn_snopt.bench.trial import After, Setup, Trial, run_trial

#: ``run(trial, data, progress)``: how a session trains one trial (default: :func:`run_trial`).
Runner = Callable[[Trial, Data, "Progress | None"], RunResult]
#: ``line(trial, result)``: the printed line of a finished run.
Line = Callable[[Trial, RunResult], str]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when present, else CPU; anything else as ``torch.device`` reads it
    (ValueError naming the value otherwise)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is invalid; accepted: auto, cpu, cuda, cuda:N, ..."
        ) from err


def check_choice(name: str, value: str, accepted: Sequence[str]) -> None:
    """ValueError naming ``name`` and ``value`` unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is unknown; accepted: {', '.join(accepted)}")


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


def accuracy_line(trial: Trial, r: RunResult) -> str:
    """``seed S NAME lr=LR: final acc A, best B, N iterations``."""
    return (
        f"  {trial.label}: final acc {r.final_acc:.4f}, best {r.best_acc:.4f}, "
        f"{r.iterations} iterations"
    )


def loss_line(trial: Trial, r: RunResult) -> str:
    """``seed S NAME lr=LR: test loss L, N iterations, ms/iteration`` (NLL, MSE tasks)."""
    return (
        f"  {trial.label}: test {trial.task.metric.upper()} {r.final_test_loss:.4f}, "
        f"{r.iterations} iterations, {r.seconds_per_iter * 1e3:.1f} ms/iteration"
    )


def default_line(trial: Trial, r: RunResult) -> str:
    """:func:`accuracy_line` for classifiers, :func:`loss_line` otherwise."""
    return (accuracy_line if trial.task.metric == "accuracy" else loss_line)(trial, r)


@dataclass
class Session:
    """One bench command's device, reporter and output folder."""

    device: torch.device
    report: Reporter
    out: Path

    @classmethod
    def open(cls, device: str | torch.device, out: str | Path, quiet: bool) -> Session:
        """The session of a command's ``--device``, ``--out`` and ``--quiet``."""
        return cls(resolve_device(device), Reporter(quiet), Path(out))

    def to_device(self, data: Iterable[torch.Tensor]) -> Data:
        """Every tensor of ``data`` on the session's device."""
        moved = tuple(t.to(self.device) for t in data)
        return moved  # type: ignore[return-value]

    def run(
        self,
        trials: Iterable[Trial],
        data: Data,
        *,
        setup: Setup | None = None,
        after: After | None = None,
        measure: bool = False,
        line: Line = default_line,
        run: Runner | None = None,
    ) -> list[RunResult]:
        """Train every trial in order, each under a progress bar, printing ``line`` after
        it (see :func:`~torchdyn_snopt.bench.trial.run_trial` for ``setup``, ``after`` and
        ``measure``; ``run`` replaces it)."""
        results = []
        for trial in trials:
            unit, total = "s", trial.budget_s
            if trial.max_iterations is not None:
                unit, total = "it", float(trial.max_iterations)
            with self.report.bar(trial.label, total, unit) as progress:
                if run is not None:
                    r = run(trial, data, progress)
                else:
                    r = run_trial(
                        trial,
                        data,
                        progress,
                        device=self.device,
                        setup=setup,
                        after=after,
                        measure=measure,
                    )
            results.append(r)
            self.report(line(trial, r))
        return results

    def finish(self, rows: list[dict[str, Any]], files: Sequence[Path], *notes: str) -> None:
        """The closing lines of a command: its table, notes and the files it wrote."""
        self.report.table(rows)
        for note in notes:
            self.report(note)
        self.report.wrote(files)
