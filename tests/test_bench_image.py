"""``torchdyn-snopt bench image``: CLI smoke runs, output files, summary arithmetic."""

from __future__ import annotations

import csv
import json
import math

import pytest

from tests.helpers.bench import check_points_from_zero
from torchdyn_snopt.__main__ import main
from torchdyn_snopt.bench.records import Point, RunResult, format_table, summary_rows


def _run(optimizer: str, seed: int, accs: list[float], dt: float = 1.0) -> RunResult:
    r = RunResult(optimizer, 0.1, seed, iterations=10 * len(accs), seconds=dt * len(accs))
    r.points = [
        Point(dt * (i + 1), 10 * (i + 1), 1.0 / (i + 1), 1.0, a) for i, a in enumerate(accs)
    ]
    return r


def test_summary_times_to_reference_best():
    runs = [
        _run("adam", 0, [0.5, 0.8, 0.9, 0.85]),  # best 0.9 reached at 3 s
        _run("snopt", 0, [0.9, 0.95, 0.95, 0.95]),  # reaches 0.9 at 1 s
        _run("sgd", 0, [0.5, 0.6, 0.7, 0.7]),  # never
    ]
    rows = {r["optimizer"]: r for r in summary_rows(runs)}
    assert rows["adam"]["s_to_adam_best"] == 3.0
    assert rows["snopt"]["s_to_adam_best"] == 1.0
    assert rows["snopt"]["x_adam_time"] == pytest.approx(1 / 3)
    assert math.isinf(rows["sgd"]["s_to_adam_best"])
    assert rows["snopt"]["s_to_sgd_best"] == 1.0 and rows["sgd"]["s_to_sgd_best"] == 3.0
    assert rows["snopt"]["final_acc"] == 0.95 and rows["adam"]["best_acc"] == 0.9
    table = format_table(list(rows.values()))
    assert "never" in table and "snopt" in table


def test_cli_bench_image_smoke(tmp_path, capsys):
    out = tmp_path / "out"
    status = main(
        ["bench", "image", "--budget-s", "1.5", "--out", str(out), "--quiet", "--batch-size", "64"]
    )
    assert status == 0
    data = json.loads((out / "image_digits.json").read_text())
    names = [row["optimizer"] for row in data["summary"]]
    assert names == ["adam", "sgd", "snopt"]
    for row in data["summary"]:
        assert 0.0 <= row["final_acc"] <= 1.0 and row["s_per_iter"] > 0
        assert row["peak_memory_mb"] == row["peak_memory_mb"]  # measured, not NaN
        assert row["reg_total"] > 0 and row["nfe_eval"] > 0  # Table 6 columns
    assert all(row["nfe_forward"] > 0 for row in data["summary"])
    check_points_from_zero(data["runs"])  # training-set loss from 0 s; minibatch mean beside it
    with open(out / "image_digits.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["optimizer"] for r in rows} == {"adam", "sgd", "snopt"}
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    assert (out / "image_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == ""


def test_cli_bench_image_sweep_and_lr_override(tmp_path, capsys):
    out = tmp_path / "sweep"
    main(
        [
            "bench",
            "image",
            "--sweep",
            "--optimizers",
            "snopt",
            "--budget-s",
            "0.5",
            "--out",
            str(out),
            "--lr",
            "snopt=0.002",
        ]
    )
    rows = json.loads((out / "sweep_digits.json").read_text())
    lrs = [r["lr"] for r in rows if r["eps"] != r["eps"]]  # NaN eps: the lr grid
    assert lrs == [1e-2, 2e-2, 5e-2]
    assert [r["eps"] for r in rows if r["eps"] == r["eps"]] == [0.03, 0.1, 0.3]
    assert all(r["lr"] == 0.002 for r in rows if r["eps"] == r["eps"])
    assert (out / "sweep_digits.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "learning rates: snopt=0.002" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dataset", "cifar"], "dataset"),
        (["--optimizers", "adam,lbfgs"], "optimizers"),
    ],
)
def test_cli_bench_image_bad_arguments(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        main(["bench", "image", "--budget-s", "0.1", "--out", str(tmp_path), "--quiet", *argv])


def test_cli_bench_image_rejects_bad_lr(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "image", "--lr", "adam"])
    assert "NAME=LR" in capsys.readouterr().err


def test_train_for_stops_a_stalled_run():
    """A run whose forward solve exceeds ``max_nfe`` evaluations is evaluated and stopped."""
    import torch

    from torchdyn_snopt.bench.image import build_model
    from torchdyn_snopt.bench.loop import train_for
    from torchdyn_snopt.data import load_image_dataset

    x, y, xt, yt = load_image_dataset("digits")
    data = (x[:64], y[:64], xt[:32], yt[:32])
    torch.manual_seed(0)
    model = build_model("digits", tuple(x.shape), "snopt")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    # dopri5 takes 14 evaluations per solve here: max_nfe 8 marks the first iteration, while
    # no single solve reaches the cap (SOLVE_CAP_FACTOR * 8 = 40) that would end it earlier
    r = train_for(model, opt, data, 30.0, name="sgd", lr=1e-3, seed=0, batch_size=32, max_nfe=8)
    assert r.iterations == 1 and r.extra == {"stalled": 1.0} and not r.error
    assert len(r.points) == 1 and 0.0 <= r.points[0].test_acc <= 1.0
    # With no cap the run is not flagged (iterations counted, not timed: under load one
    # iteration may outlast the 0.3 s budget).
    r = train_for(model, opt, data, 0.3, name="sgd", lr=1e-3, seed=0, batch_size=32, max_nfe=10**6)
    assert r.iterations >= 1 and "stalled" not in r.extra


def test_a_failed_solve_is_a_diverged_run(monkeypatch):
    """A solver failure inside one run marks it diverged instead of ending the whole bench,
    and without catch_failures it propagates."""
    from dataclasses import replace

    import torch

    import torchdyn_snopt.bench.image as image
    import torchdyn_snopt.bench.loop as loop
    from torchdyn_snopt.bench.records import grid_rows
    from torchdyn_snopt.bench.trial import Trial, run_trial
    from torchdyn_snopt.data import load_image_dataset

    def underflow(*args, **kwargs):
        raise RuntimeError("the adjoint solve's step size underflowed")

    monkeypatch.setattr(loop, "_cross_entropy", underflow)  # train_for's default loss
    x, y, xt, yt = load_image_dataset("digits")
    common_data = (x[:64], y[:64], xt[:32], yt[:32])
    task = replace(image.task("digits", batch_size=32), loss=underflow)
    with pytest.warns(UserWarning, match="sgd lr=0.1 seed 0 diverged: the adjoint"):
        r = run_trial(Trial(task, "sgd", 0.1, 0, 1.0), common_data, measure=True)
    assert r.extra == {"diverged": 1.0} and r.points == [] and math.isnan(r.final_acc)
    assert grid_rows([r])[0]["diverged"] == 1
    model = image.build_model("digits", tuple(x.shape), "snopt")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="underflowed"):
        loop.train_for(model, opt, common_data, 1.0, name="sgd", lr=0.1, seed=0)


def test_summary_counts_a_flag_of_any_seed():
    """A flag set on a later seed only (seed 0 trained normally) still shows in the summary."""
    runs = [RunResult("sgd", 0.03, s, extra={"stalled": 1.0} if s else {}) for s in range(3)]
    (row,) = summary_rows(runs, references=())
    assert row["stalled"] == 2 / 3
