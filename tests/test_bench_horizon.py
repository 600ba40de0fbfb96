"""``torchdyn-snopt bench horizon``: CLI smoke run, output files, settle/summary arithmetic."""

from __future__ import annotations

import json
import math

import pytest

from torchdyn_snopt.__main__ import main
from torchdyn_snopt.bench.horizon import HorizonRun, settle_iteration, summary_rows


def test_settle_iteration_is_where_t1_stops_leaving_the_band():
    history = [(0, 1.0), (10, 0.6), (20, 0.9), (30, 0.52), (40, 0.5), (50, 0.49)]
    assert settle_iteration(history) == 30  # 0.9 is outside ±10% of 0.49, 0.52 inside
    assert settle_iteration([(0, 1.0), (10, 1.0)]) == 0


def test_summary_is_relative_to_fixed_t1_one():
    runs = [
        HorizonRun("fixed", 1.0, 0, seconds=10.0, test_acc=0.9, final_t1=1.0),
        HorizonRun("fixed", 1.0, 1, seconds=12.0, test_acc=0.92, final_t1=1.0),
        HorizonRun("feedback", 1.0, 0, seconds=8.0, test_acc=0.91, final_t1=0.5),
        HorizonRun("feedback", 1.0, 1, seconds=8.5, test_acc=0.9, final_t1=0.6),
    ]
    rows = {r["policy"]: r for r in summary_rows(runs)}
    assert rows["fixed"]["time_vs_fixed1"] == 1.0
    assert rows["feedback"]["time_vs_fixed1"] == pytest.approx(8.25 / 11.0)
    assert rows["feedback"]["acc_minus_fixed1"] == pytest.approx(0.905 - 0.91)
    assert rows["feedback"]["final_t1"] == pytest.approx(0.55)


def test_cli_bench_horizon_smoke(tmp_path, capsys):
    out = tmp_path / "h"
    argv = ["bench", "horizon", "--epochs", "1", "--seeds", "1", "--fixed-t1", "0.5"]
    assert main([*argv, "--tol", "1e-3", "--out", str(out), "--quiet"]) == 0
    data = json.loads((out / "horizon_digits.json").read_text())
    rows = {(r["policy"], r["t1_start"]): r for r in data["summary"]}
    assert set(rows) == {("fixed", 1.0), ("baseline", 1.0), ("feedback", 1.0), ("fixed", 0.5)}
    assert rows[("fixed", 0.5)]["final_t1"] == 0.5
    for row in rows.values():
        assert 0.0 <= row["test_acc"] <= 1.0 and row["train_s"] > 0 and row["nfe_forward"] > 0
    for run in data["runs"]:
        assert run["history"][0][0] == 0 and len(run["epoch_acc"]) == 1
    assert rows[("feedback", 1.0)]["t1_star"] > 0 and rows[("baseline", 1.0)]["t1_star"] > 0
    assert math.isnan(rows[("fixed", 1.0)]["t1_star"])
    assert data["settings"]["weight_decay"] == 1e-2
    assert data["settings"]["horizon"]["feedback"]["lr"] == 0.5
    assert (out / "horizon_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == ""


def test_cli_penalty_reaches_both_policies(monkeypatch):
    from torchdyn_snopt.bench import horizon

    seen = {}
    monkeypatch.setattr(horizon, "bench_horizon", lambda **kw: seen.update(kw))
    assert main(["bench", "horizon", "--penalty", "0.03", "--quiet"]) == 0
    assert seen["horizon_options"] == {"penalty": 0.03}
    assert main(["bench", "horizon", "--quiet"]) == 0
    assert seen["horizon_options"] is None


def test_cli_weight_decay_reaches_the_bench(monkeypatch):
    from torchdyn_snopt.bench import horizon

    seen = {}
    monkeypatch.setattr(horizon, "bench_horizon", lambda **kw: seen.update(kw))
    assert main(["bench", "horizon", "--weight-decay", "0.003", "--quiet"]) == 0
    assert seen["weight_decay"] == 0.003
    assert main(["bench", "horizon", "--quiet"]) == 0
    assert seen["weight_decay"] == horizon.DEFAULT_WEIGHT_DECAY == 1e-2


@pytest.mark.parametrize("name", ["adam", "sgd", "snopt"])
def test_weight_decay_reaches_every_optimizer(name):
    import torch

    from torchdyn_snopt.bench.image import build_model, build_optimizer

    model = build_model("digits", (1, 1, 8, 8), "snopt")
    opt = build_optimizer(name, model, 1e-3, weight_decay=0.02)
    if name == "snopt":
        assert opt.preconditioner.weight_decay == 0.02
    else:
        assert {g["weight_decay"] for g in opt.param_groups} == {0.02}
    assert isinstance(opt, torch.optim.Optimizer)


def test_bad_weight_decay_is_rejected_before_training(tmp_path):
    from torchdyn_snopt.bench.horizon import bench_horizon

    with pytest.raises(ValueError, match=r"weight_decay=-0\.1 is invalid; accepted: a float >= 0"):
        bench_horizon(weight_decay=-0.1, out=tmp_path, quiet=True)
    assert not any(tmp_path.iterdir())


def test_implied_horizon_by_hand():
    """sqrt(γ‖(W, b)‖²/c) of the field's last convolution, and nan without decay or penalty."""
    import torch

    from torchdyn_snopt.bench.horizon import _implied_horizon
    from torchdyn_snopt.bench.image import build_model

    model = build_model("digits", (1, 1, 8, 8), "snopt")
    out = model.ode.vf.vf.net[-1]
    with torch.no_grad():
        out.weight.fill_(0.1)
        out.bias.fill_(0.5)
    norm2 = out.weight.numel() * 0.01 + out.bias.numel() * 0.25
    assert _implied_horizon(model, 1e-2, 0.3) == pytest.approx(math.sqrt(1e-2 * norm2 / 0.3))
    assert math.isnan(_implied_horizon(model, 0.0, 0.3))
    assert math.isnan(_implied_horizon(model, 1e-2, 0.0))
