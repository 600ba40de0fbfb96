"""``torchdyn-snopt bench cnf``: CLI smoke runs, output files, summary arithmetic."""

from __future__ import annotations

import csv
import json
import math

import pytest

from tests.helpers.bench import check_points_from_zero
from torchdyn_snopt.__main__ import main
from torchdyn_snopt.bench.cnf import LR_GRID, summary
from torchdyn_snopt.bench.records import Point, RunResult

PNG = b"\x89PNG\r\n\x1a\n"


def _run(name: str, nlls: list[float], s_per_iter: float, mem: float) -> RunResult:
    r = RunResult(name, 0.01, 0, iterations=10 * len(nlls), seconds=10 * len(nlls) * s_per_iter)
    r.points = [Point(i + 1.0, 10 * (i + 1), 2.0, v, math.nan) for i, v in enumerate(nlls)]
    r.peak_memory_mb = mem
    return r


def test_summary_nll_and_ratios_to_adam():
    rows = {
        r["optimizer"]: r
        for r in summary(
            [_run("adam", [2.0, 1.5, 1.6], 0.1, 10.0), _run("snopt", [1.8, 1.2], 0.15, 12.0)]
        )
    }
    assert rows["adam"]["test_nll"] == 1.6 and rows["adam"]["best_test_nll"] == 1.5
    assert rows["snopt"]["x_adam_time_iter"] == pytest.approx(1.5)
    assert rows["snopt"]["x_adam_memory"] == pytest.approx(1.2)
    assert rows["adam"]["x_adam_time_iter"] == 1.0 and rows["snopt"]["diverged"] == 0


def test_cli_bench_cnf_circles_smoke(tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["bench", "cnf", "--budget-s", "1.0", "--out", str(out), "--quiet"])
    assert status == 0
    data = json.loads((out / "cnf_circles.json").read_text())
    assert [row["optimizer"] for row in data["summary"]] == ["adam", "sgd", "snopt"]
    for row in data["summary"]:
        assert math.isfinite(row["test_nll"]) and row["s_per_iter"] > 0
        assert row["peak_memory_mb"] == row["peak_memory_mb"] and row["nfe_forward"] > 0
    assert set(data["lrs"]) == {"adam", "sgd", "snopt"} and data["lr_check"] == []
    # training NLL on the training points from 0 s (the same initial weights and Hutchinson
    # noise: one value for every optimizer), the minibatch mean beside it
    assert len({run["points"][0]["train_loss"] for run in data["runs"]}) == 1
    check_points_from_zero(data["runs"], positive=False)
    last = {run["optimizer"]: run["points"][-1]["train_loss"] for run in data["runs"]}
    assert {row["optimizer"]: row["train_nll"] for row in data["summary"]} == last
    with open(out / "cnf_circles.csv") as fh:
        assert {r["optimizer"] for r in csv.DictReader(fh)} == {"adam", "sgd", "snopt"}
    assert (out / "cnf_circles.png").read_bytes()[:8] == PNG
    assert (out / "cnf_circles_density.png").read_bytes()[:8] == PNG
    assert capsys.readouterr().out == ""


def test_cli_bench_cnf_tabular_lr_check(tmp_path, capsys):
    out = tmp_path / "wine"
    main(
        ["bench", "cnf", "--dataset", "wine", "--optimizers", "sgd", "--budget-s", "0.4",
         "--lr-check", "--lr-check-s", "0.2", "--out", str(out)]
    )  # fmt: skip
    data = json.loads((out / "cnf_wine.json").read_text())
    assert [c["lr"] for c in data["lr_check"]] == list(LR_GRID["sgd"])
    best = min(data["lr_check"], key=lambda c: c["test_nll"])
    assert data["lrs"]["sgd"] == best["lr"]
    assert not (out / "cnf_wine_density.png").exists()  # 13-d: no density plot
    assert "lr check sgd" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"dataset": "gas"}, "dataset"), ({"optimizers": ("adam", "lbfgs")}, "optimizers")],
)
def test_bench_cnf_bad_arguments(kw, message, tmp_path):
    from torchdyn_snopt.bench.cnf import bench_cnf

    with pytest.raises(ValueError, match=message):
        bench_cnf(budget_s=0.1, out=tmp_path, quiet=True, **kw)
