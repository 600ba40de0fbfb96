"""``torchdyn-snopt bench suite``: smoke runs and outputs, the time-to-loss arithmetic, argument
checks, the snopt-default construction, and every task's model training a little."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import torchdyn_snopt as tds
from torchdyn_snopt.__main__ import main
from torchdyn_snopt.bench import loop, optimizers, suite
from torchdyn_snopt.bench.records import Point, RunResult
from torchdyn_snopt.bench.suite_tasks import TASKS, mean_loss, quiet_build

PNG = b"\x89PNG\r\n\x1a\n"


def _run(name: str, curve: list[tuple[float, float]], seed: int = 0) -> RunResult:
    """A run whose logged (seconds, training loss) points are ``curve``."""
    r = RunResult(name, 0.01, seed, iterations=10 * len(curve), seconds=curve[-1][0])
    r.points = [Point(t, 10 * i, v, math.nan, math.nan) for i, (t, v) in enumerate(curve)]
    return r


# --------------------------------------------------------------------------- arithmetic


def test_time_to_adam_loss_and_ratio_on_a_hand_made_curve():
    adam = _run("adam", [(0.0, 1.0), (1.0, 0.5), (2.0, 0.3), (3.0, 0.31), (4.0, 0.3)])
    fast = _run("snopt", [(0.0, 1.0), (0.5, 0.4), (1.0, 0.25), (4.0, 0.1)])
    never = _run("sgd", [(0.0, 1.0), (4.0, 0.6)])
    # Adam's final loss is 0.3; Adam first reaches it at 2 s (not at its last point)
    assert suite.time_to_loss(adam, 0.3) == 2.0
    assert suite.time_to_loss(fast, 0.3) == 1.0
    assert suite.time_to_loss(never, 0.3) == math.inf
    assert math.isnan(suite.time_to_loss(never, math.nan))
    ratios = suite.adam_ratios([adam, fast, never])
    assert ratios == {("adam", 0): 1.0, ("snopt", 0): 0.5, ("sgd", 0): math.inf}


def test_ratio_is_per_seed_and_undefined_without_adam_progress():
    runs = [
        _run("adam", [(0.0, 1.0), (2.0, 0.5)], seed=0),
        _run("snopt", [(0.0, 1.0), (1.0, 0.5)], seed=0),
        # seed 1: Adam never improves, so it "reaches" its final loss at 0 s: no ratio
        _run("adam", [(0.0, 1.0), (2.0, 1.2)], seed=1),
        _run("snopt", [(0.0, 1.0), (1.0, 0.1)], seed=1),
        _run("snopt", [(0.0, 1.0), (1.0, 0.1)], seed=2),  # no Adam run of seed 2
    ]
    ratios = suite.adam_ratios(runs)
    assert ratios[("snopt", 0)] == 0.5
    assert math.isnan(ratios[("adam", 1)]) and math.isnan(ratios[("snopt", 1)])
    assert math.isnan(ratios[("snopt", 2)])
    assert suite.median([0.5, math.nan, math.inf]) == pytest.approx(math.inf)
    assert suite.median([0.5, 2.0, math.inf]) == 2.0 and math.isnan(suite.median([math.nan]))


def test_summary_rows_winner_and_overall():
    task = TASKS["flowmap"]
    runs = []
    for seed in range(3):
        runs += [
            _run("adam", [(0.0, 1.0), (1.0, 0.5), (2.0, 0.2)], seed),
            _run("snopt", [(0.0, 1.0), (0.5, 0.2), (2.0, 0.1)], seed),
            _run("sgd", [(0.0, 1.0), (2.0, 0.95)], seed),
        ]
    for r in runs:
        suite.flag_run(r)
    rows = {r["optimizer"]: r for r in suite.task_rows(task, runs, {"adam": "prior"})}
    assert rows["snopt"]["x_adam_time"] == 0.25 and rows["snopt"]["reached"] == 3
    assert rows["snopt"]["s_to_adam_loss"] == 0.5 and rows["adam"]["x_adam_time"] == 1.0
    assert rows["sgd"]["x_adam_time"] == math.inf and rows["sgd"]["stalled"] == 3
    assert rows["adam"]["lr_source"] == "prior" and rows["snopt"]["diverged"] == 0
    assert rows["snopt"]["final_train_loss"] == pytest.approx(0.1)
    o = suite.overall({"flowmap": list(rows.values()), "spiral": list(rows.values())})
    assert o["winners"] == {"flowmap": "snopt", "spiral": "snopt"}
    assert o["wins"] == {"adam": 0, "snopt": 2, "sgd": 0}
    assert o["median_x_adam_time"]["snopt"] == 0.25


def test_flags_diverged_and_stalled_also_for_negative_losses():
    cases = {
        "ok": ([(0.0, 2.0), (1.0, 1.7)], {}),
        "stall": ([(0.0, 2.0), (1.0, 1.9)], {"stalled": 1.0}),
        "nll_ok": ([(0.0, -1.0), (1.0, -1.2)], {}),
        "nll_stall": ([(0.0, -1.0), (1.0, -1.05)], {"stalled": 1.0}),
        "nan": ([(0.0, 2.0), (1.0, math.nan)], {"diverged": 1.0}),
    }
    for curve, expected in cases.values():
        r = _run("adam", curve)
        suite.flag_run(r)
        assert r.extra == expected, curve
    r = _run("adam", [(0.0, 2.0), (1.0, 0.1)])
    r.error = "step size underflowed"
    suite.flag_run(r)
    assert r.extra == {"diverged": 1.0}


def test_usable_range_of_a_grid():
    pts = [(1e-4, 0.9, False), (1e-3, 0.3, False), (1e-2, 0.2, False), (1e-1, 0.35, False)]
    u = suite.usable_range(pts + [(1.0, 0.01, True)])  # the failed rate does not count
    assert u["best_lr"] == 1e-2 and u["best_loss"] == 0.2
    assert (u["low"], u["high"], u["count"]) == (1e-3, 1e-1, 3)
    assert u["ratio"] == pytest.approx(100.0)
    neg = suite.usable_range([(1e-3, -2.0, False), (1e-2, -0.5, False), (1e-1, 0.5, False)])
    assert (neg["low"], neg["high"]) == (1e-3, 1e-2)  # within |best| of best = -2
    assert suite.usable_range([(1e-3, 1.0, True)])["count"] == 0


def test_rates_file_covers_every_task_and_ships_as_package_data():
    rates = suite.load_rates()
    for task in TASKS:
        for name in suite.TUNED:
            entry = rates["rates"][task][name]
            assert entry["lr"] > 0 and entry["source"] in ("prior", "sweep")
    for name in suite.TUNED:
        grid = suite.lr_grid(rates, name)  # the sweep's: half a decade apart
        assert len(grid) == 5 and grid == sorted(grid)
        fine = suite.lr_grid(rates, name, suite.SENSITIVITY_POINTS)  # --lr-sensitivity's
        assert len(fine) == 11 and (fine[0], fine[-1]) == (grid[0], grid[-1])
        assert fine[5] == pytest.approx(grid[2])  # the centre rate is on both grids
    assert suite.lr_grid(rates, "adam") == [0.001, 0.00316, 0.01, 0.0316, 0.1]
    # snopt-default's grid (--lr-sensitivity only): two decades centred on SNOpt's default rate
    fine = suite.lr_grid(rates, "snopt-default", suite.SENSITIVITY_POINTS)
    assert len(fine) == 11 and (fine[0], fine[-1]) == (0.005, 0.5)
    assert fine[5] == pytest.approx(optimizers.snopt_default_lr())  # SNOpt(model) is on it
    assert math.sqrt(fine[0] * fine[-1]) == pytest.approx(optimizers.snopt_default_lr())
    assert "snopt-default" not in suite.TUNED and "snopt-default" in suite.SENSITIVITY_OPTIMIZERS
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    package_data = text.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"torchdyn_snopt.bench" = ["suite_rates.json"]' in package_data
    extras = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]

    def extra(name: str) -> str:  # the list of one extra, e.g. 'bench = [ ... ]'
        return extras.split(f"\n{name} = [", 1)[1].split("]\n", 1)[0]

    assert '"pytorch-optimizer' in extra("bench")
    assert '"torchdyn-snopt[bench' in extra("test")
    core = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "pytorch-optimizer" not in core


# --------------------------------------------------------------------------- optimizers


def test_snopt_default_is_snopt_model_at_the_default_rate_and_takes_any_other_rate(monkeypatch):
    model = quiet_build(TASKS["flowmap"], TASKS["flowmap"].load())
    default = optimizers.snopt_default_lr()
    assert default is not None and optimizers.snopt_lr_has_default()
    opt = optimizers.make_optimizer("snopt-default", model, default, {"update_freq": 1})
    assert opt.param_groups[0]["lr"] == default  # its own rate; the options are ignored
    assert opt.preconditioner.update_freq != 1
    opt = optimizers.make_optimizer("snopt-default", model, 123.0, {"update_freq": 1})
    assert opt.param_groups[0]["lr"] == 123.0  # --lr-sensitivity's grid rates get through
    assert opt.preconditioner.update_freq != 1
    with pytest.raises(ValueError, match=r"weight_decay=0.1 is invalid for snopt-default"):
        optimizers.make_optimizer("snopt-default", model, default, {}, 0.1)

    class Rate(float):  # a default told apart from the same rate passed explicitly
        pass

    own = Rate(0.05)
    calls = []

    class WithDefaults:
        def __init__(self, model: torch.nn.Module, lr: float = own, **kw: object) -> None:
            calls.append((lr, kw))

    monkeypatch.setattr(optimizers, "SNOpt", WithDefaults)
    assert optimizers.snopt_default_lr() == 0.05
    optimizers.make_optimizer("snopt-default", model, 0.05, {"update_freq": 1})
    assert calls[-1][0] is own and calls[-1][1] == {}  # exactly SNOpt(model)
    optimizers.make_optimizer("snopt-default", model, 0.2, {"update_freq": 1})
    assert calls[-1] == (0.2, {}) and calls[-1][0] is not own  # SNOpt(model, lr=0.2)
    assert suite.rate_of({}, "flowmap", "snopt-default") == (0.05, "default")


def test_tuned_snopt_is_the_paper_rule_whatever_snopts_defaults():
    """The suite's ``snopt`` (``FIXED_DAMPING`` plus each task's refresh interval and
    coverage) steps bit for bit like ``SNOpt.paper`` with those two overrides: no warmup, no
    graft, fixed damping 0.05, momentum 0.9. Kills a default of ``SNOpt`` (the warmup, say)
    leaking into the row that stands for the published rule."""
    task = TASKS["flowmap"]
    data = task.load()
    x, y = data[0][:32], data[1][:32]
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(quiet_build(task, data))
    options = dict(task.snopt_options)
    suite_opt = optimizers.make_optimizer("snopt", models[0], 0.01, options)
    overrides = {k: options[k] for k in ("update_freq", "full_precond") if k in options}
    paper = tds.SNOpt.paper(models[1], lr=0.01, **overrides)
    for _ in range(3):
        for model, opt in zip(models, (suite_opt, paper)):
            opt.zero_grad()
            task.loss(model, x, y).backward()
            opt.step()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)


def test_soap_is_built_with_the_given_rate_and_no_weight_decay():
    model = quiet_build(TASKS["flowmap"], TASKS["flowmap"].load())
    opt = optimizers.make_optimizer("soap", model, 0.02, {})
    assert type(opt).__name__ == "SOAP"
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["weight_decay"] == 0.0


def test_missing_pytorch_optimizer_names_the_bench_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)
    with pytest.raises(ImportError, match=r'pip install "torchdyn-snopt\[bench\]"'):
        suite.bench_suite(tasks="flowmap", optimizers="adam,soap", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kw", "pattern"),
    [
        ({"tasks": "flowmap,imagenet"}, r"tasks='flowmap,imagenet'.*'imagenet'.*accepted.*digits"),
        ({"tasks": ""}, r"tasks=''.*empty.*accepted"),
        ({"optimizers": "adam,lbfgs"}, r"optimizers=.*'lbfgs'.*accepted.*snopt-default"),
        ({"budget_s": 0.0}, r"budget_s=0.0 is invalid; accepted: a finite float > 0"),
        ({"budget_s": -3.0}, r"budget_s=-3.0 is invalid"),
        ({"budget_s": math.inf}, r"budget_s=inf is invalid"),
        ({"seeds": 0}, r"seeds=0 is invalid; accepted: an int >= 1"),
        ({"sweep": True, "lr_sensitivity": True}, r"at most one"),
        ({"sweep": True, "grid_budget_s": -1.0}, r"budget_s=-1.0 is invalid"),
        ({"sweep": True, "optimizers": "snopt-default"}, r"--sweep; accepted: at least one of"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(kw, pattern, tmp_path, monkeypatch):
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a run started")

    monkeypatch.setattr(suite, "run_trial", boom)
    monkeypatch.setattr(suite, "load_rates", boom)
    with pytest.raises(ValueError, match=pattern):
        suite.bench_suite(**{"tasks": "flowmap", **kw}, out=tmp_path / "o", quiet=True)
    assert not (tmp_path / "o").exists()


def test_a_rates_file_without_the_task_fails_before_anything_runs(tmp_path, monkeypatch):
    rates = json.loads(suite.RATES_PATH.read_text())
    del rates["rates"]["spiral"]["sgd"]
    path = tmp_path / "rates.json"
    path.write_text(json.dumps(rates))
    monkeypatch.setattr(suite, "run_trial", None)  # calling it would raise TypeError
    with pytest.raises(ValueError, match=r"rates_path=.*rates.json.*'sgd'"):
        suite.bench_suite(tasks="flowmap,spiral", rates_path=path, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--tasks", "mnist,cifar"], r"--tasks: 'mnist,cifar' is invalid \(unknown task 'cifar'\)"),
        (["--optimizers", "adamw"], r"--optimizers: 'adamw' is invalid.*accepted: .*soap"),
        (["--budget-s", "0"], r"--budget-s: '0' is invalid; accepted: a finite float > 0"),
        (["--seeds", "0"], r"--seeds: '0' is invalid; accepted: an int >= 1"),
        (["--sweep", "--lr-sensitivity"], r"not allowed with argument"),
    ],
)
def test_cli_bad_arguments_name_the_option(argv, pattern, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "suite", *argv])
    import re

    assert re.search(pattern, capsys.readouterr().err)


def test_cli_help_states_the_full_run_estimate(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "suite", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "135 runs" in text and "min on this 2-core machine" in text
    assert "--lr-sensitivity" in text and "--grid-budget-s" in text


# --------------------------------------------------------------------------- smoke runs


def test_quick_suite_writes_markdown_json_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "suite", "--quick", "--tasks", "flowmap,spiral", "--optimizers",
            "adam,snopt", "--budget-s", "1", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out == ""
    doc = json.loads((out / "suite.json").read_text())
    assert doc["command"] == "torchdyn-snopt " + " ".join(argv)
    doc = json.loads((out / "suite.json").read_text())
    for key in ("command", "date", "machine", "versions", "settings", "tasks", "summary"):
        assert key in doc
    assert doc["settings"]["budget_s"] == 1.0 and doc["settings"]["seeds"] == 1
    assert doc["machine"]["cpu_count"] >= 1 and doc["versions"]["torch"] == torch.__version__
    assert set(doc["summary"]) == {"flowmap", "spiral"}
    assert set(doc["overall"]["wins"]) == {"adam", "snopt"}
    for task in ("flowmap", "spiral"):
        info = doc["tasks"][task]
        assert info["solver"] and info["batch_size"] > 0 and info["description"].startswith(task)
        assert set(info["rates"]) == {"adam", "snopt"}
        rows = {r["optimizer"]: r for r in doc["summary"][task]}
        assert rows["adam"]["reached"] == 1  # Adam reaches its own final loss
        assert rows["adam"]["x_adam_time"] == 1.0 or math.isnan(rows["adam"]["x_adam_time"])
        for row in rows.values():
            assert math.isfinite(row["final_train_loss"]) and math.isfinite(row["test_mse"])
            assert row["s_per_iter"] > 0 and row["nfe_forward"] > 0 and row["nfe_backward"] > 0
    runs = doc["runs"]
    assert {(r["task"], r["optimizer"]) for r in runs} == {
        (t, o) for t in ("flowmap", "spiral") for o in ("adam", "snopt")
    }
    for r in runs:
        assert r["points"][0]["seconds"] == 0.0 and r["points"][0]["iteration"] == 0
        assert r["points"][-1]["seconds"] >= 1.0 and r["iterations"] >= 1
    md = (out / "suite.md").read_text()
    assert "## Overall" in md and "## flowmap" in md and "## spiral" in md
    assert "| optimizer |" in md and "suite.png" in md
    assert (out / "suite.png").read_bytes()[:8] == PNG


def test_sweep_rewrites_the_rates_file_and_reports_sensitivity(tmp_path, monkeypatch):
    """The grid plumbing on made-up runs (no training): final loss ``(log10 lr + 2)² + 0.2``
    has its best at 1e-2; rates above 0.05 diverge."""

    def fake(trial: suite.Trial, data: object, progress: object = None) -> RunResult:
        if trial.lr > 0.05:
            r = _run(trial.optimizer, [(0.0, 1.0)])
            r.error = "step size underflowed"
        else:
            final = (math.log10(trial.lr) + 2) ** 2 + 0.2
            r = _run(trial.optimizer, [(0.0, 10.0), (trial.budget_s, final)])
        r.lr = trial.lr
        suite.flag_run(r)
        return r

    monkeypatch.setattr(suite, "run_trial", fake)
    rates = tmp_path / "rates.json"
    shutil.copy(suite.RATES_PATH, rates)
    doc = suite.bench_suite(
        tasks="flowmap,spiral",
        optimizers="adam,snopt-default",
        sweep=True,
        grid_budget_s=0.2,
        rates_path=rates,
        out=tmp_path / "out",
        quiet=True,
    )
    grid = suite.lr_grid(suite.load_rates(rates), "adam")
    assert [r["lr"] for r in doc["lr_runs"]] == grid + grid  # --sweep never tunes snopt-default
    assert {r["optimizer"] for r in doc["lr_runs"]} == {"adam"}
    new = json.loads(rates.read_text())
    assert new["rates"]["flowmap"]["adam"] == {
        "lr": 0.01,
        "source": "sweep",
        "note": new["rates"]["flowmap"]["adam"]["note"],
    }
    assert new["rates"]["flowmap"]["sgd"] == suite.load_rates()["rates"]["flowmap"]["sgd"]  # kept
    assert new["sweeps"]["spiral"]["budget_s"] == 0.2 and new["grid"] == suite.load_rates()["grid"]
    u = doc["sensitivity"]["flowmap"]["adam"]
    # usable: loss <= 2 x 0.2, i.e. |log10 lr + 2| <= 0.447: of 3.16e-3, 1e-2, 3.16e-2 only 1e-2
    assert (u["low"], u["high"], u["count"]) == (0.01, 0.01, 1)
    assert u["ratio"] == pytest.approx(1.0) and u["best_lr"] == 0.01
    assert [r["lr"] for r in doc["lr_runs"] if r["diverged"]] == [0.1, 0.1]
    for name in ("lr_sensitivity.md", "lr_sensitivity.json"):
        assert (tmp_path / "out" / name).is_file()
    assert (tmp_path / "out" / "lr_sensitivity.png").read_bytes()[:8] == PNG
    assert "adam: median max/min" in (tmp_path / "out" / "lr_sensitivity.md").read_text()

    # --lr-sensitivity: 10 rates per optimizer, snopt-default over its own grid; rates untouched
    before = rates.read_text()
    doc = suite.bench_suite(
        tasks="flowmap",
        optimizers="adam,snopt-default",
        lr_sensitivity=True,
        grid_budget_s=0.2,
        rates_path=rates,
        out=tmp_path / "sens",
        quiet=True,
    )
    loaded = suite.load_rates(rates)
    adam = suite.lr_grid(loaded, "adam", suite.SENSITIVITY_POINTS)
    default = suite.lr_grid(loaded, "snopt-default", suite.SENSITIVITY_POINTS)
    assert doc["grid"] == {"adam": adam, "snopt-default": default}
    assert [(r["optimizer"], r["lr"]) for r in doc["lr_runs"]] == [
        *(("adam", lr) for lr in adam),
        *(("snopt-default", lr) for lr in default),
    ]
    assert set(doc["sensitivity"]["flowmap"]) == {"adam", "snopt-default"}
    assert rates.read_text() == before
    md = (tmp_path / "sens" / "lr_sensitivity.md").read_text()
    assert "## Usable learning rates: snopt-default and adam" in md


# --------------------------------------------------------------------------- the nine tasks


@pytest.mark.parametrize("name", list(TASKS))
def test_task_model_trains_a_little_with_adam(name):
    """Finite loss that decreases over a few Adam steps on one fixed minibatch (evaluated with
    fixed noise); a missing dataset fails here with its loader's install hint."""
    task = TASKS[name]
    data = task.load()
    torch.manual_seed(0)
    model = quiet_build(task, data)
    x, y = data[0][: min(task.batch_size, 64)], data[1][: min(task.batch_size, 64)]
    # Adam's first steps move every weight by about lr: 3e-4 is gentle enough for all nine
    # (circles integrates to t = 10 with a noisy trace: at 1e-3 its first step overshoots)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    before = mean_loss(task, model, x, y)
    for _ in range(4):
        opt.zero_grad()
        task.loss(model, x, y).backward()
        opt.step()
    after = mean_loss(task, model, x, y)
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before


# --------------------------------------------------------------------------- train_for additions


def _linear_problem() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1), (x, y, x[:8], y[:8])


def _failing_loss(fail_at: int, how: str):
    calls = [0]

    def loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == fail_at:
            if how == "raise":
                raise RuntimeError("step size underflowed")
            return torch.nn.functional.mse_loss(model(x), y) * math.nan
        return torch.nn.functional.mse_loss(model(x), y)

    return loss


@pytest.mark.parametrize("how", ["raise", "nan"])
def test_train_for_keeps_a_failed_runs_points_and_logs_from_zero(how):
    model, data = _linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    r = loop.train_for(
        model, opt, data, 60.0, name="sgd", lr=0.05, seed=0, batch_size=16, n_evals=10**6,
        loss_fn=_failing_loss(6, how), eval_fn=lambda *_: (math.nan, math.nan),
        train_eval_fn=lambda m: float(torch.nn.functional.mse_loss(m(data[0]), data[1]).detach()),
        catch_failures=True, keep_partial=True,
    )  # fmt: skip
    assert r.extra.get("diverged") == 1.0 and r.seconds < 60.0
    assert r.points[0].seconds == 0.0 and r.points[0].iteration == 0
    assert [p.iteration for p in r.points][:6] == [0, 1, 2, 3, 4, 5]
    assert r.points[4].train_loss < r.points[0].train_loss  # it trained before failing
    assert (r.error == "step size underflowed") == (how == "raise")
    assert r.iterations == (5 if how == "raise" else 6)


class _BreakAt(torch.optim.SGD):
    """SGD (rate 0.01) whose ``at``-th step is followed by ``damage()``: what an overflowing
    step leaves behind (a NaN weight, a field stiff enough to stall an adaptive solver)."""

    def __init__(self, params, at: int, damage: Callable[[], object]) -> None:
        super().__init__(params, lr=0.01)
        self.at, self.damage, self.calls = at, damage, 0

    @torch.no_grad()
    def step(self, closure=None):
        self.calls += 1
        super().step(closure)
        if self.calls == self.at:
            self.damage()


def _encoded_ode(solver: str = "rk4") -> torch.nn.Module:
    """Linear encoder -> snopt NeuralODE: a non-finite weight makes the solve raise
    ValueError (the snopt sensitivity refuses a non-finite initial state)."""
    from torchdyn.core import NeuralODE

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchdyn's notices
        ode = NeuralODE(torch.nn.Linear(2, 2), sensitivity="snopt", solver=solver)
    t = torch.linspace(0, 1, 3)

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.ode, self.head = torch.nn.Linear(3, 2), ode, torch.nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.ode(self.enc(x), t)[1][-1])

    return Model()


def test_train_for_counts_non_finite_weights_as_divergence_and_raises_other_value_errors():
    """A step that leaves a NaN weight while its minibatch loss was finite: the next solve
    raises ValueError, and the run ends as diverged with its points so far (the suite's
    Fashion-MNIST SGD runs ended that way, and the ValueError used to abort the whole
    suite). A ValueError with finite weights is a bug and propagates."""
    _, data = _linear_problem()
    model = _encoded_ode()
    first = next(model.parameters())[0, 0]
    mse = lambda m, x, y: torch.nn.functional.mse_loss(m(x), y)  # noqa: E731
    poisoned = _BreakAt(model.parameters(), 4, lambda: first.fill_(math.nan))
    r = loop.train_for(
        model, poisoned, data, 60.0, name="sgd", lr=0.01, seed=0, batch_size=16,
        n_evals=10**6, loss_fn=mse, eval_fn=lambda *_: (math.nan, math.nan),
        train_eval_fn=lambda m: float(mse(m, data[0], data[1]).detach()),
        catch_failures=True, keep_partial=True,
    )  # fmt: skip
    assert r.extra.get("diverged") == 1.0 and r.iterations == 4
    assert [p.iteration for p in r.points] == [0, 1, 2, 3]
    assert "non-finite" in r.error

    def bad_loss(m, x, y):
        raise ValueError("a bug, not a divergence")

    with pytest.raises(ValueError, match="a bug"):
        loop.train_for(
            _encoded_ode(), torch.optim.SGD(model.parameters(), lr=0.01), data, 60.0,
            name="sgd", lr=0.01, seed=0, batch_size=16, n_evals=10**6, loss_fn=bad_loss,
            catch_failures=True, keep_partial=True,
        )  # fmt: skip


def test_train_for_stops_a_run_whose_solve_exceeds_the_cap():
    """A step that makes the field stiff (weight ``-1e4·I``) while the loss stays finite: the
    evaluation's solve (and the next iteration's) would take about 10^4 field evaluations;
    with ``max_nfe`` the run ends as stalled once one solve exceeds ``SOLVE_CAP_FACTOR *
    max_nfe``, keeping its points (a Fashion-MNIST SGD run of the suite sat in one such
    evaluation for 36 minutes).
    The hooks are gone afterwards: the same stiff solve then runs to its end."""
    _, data = _linear_problem()
    model = _encoded_ode("dopri5")
    problem = next(m for m in model.modules() if tds.registration.is_snopt_problem(m))
    calls = [0]
    model.ode.vf.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    field = next(m for m in model.ode.modules() if isinstance(m, torch.nn.Linear))
    stiffen = lambda: field.weight.copy_(-1e4 * torch.eye(2))  # noqa: E731
    mse = lambda m, x, y: torch.nn.functional.mse_loss(m(x), y)  # noqa: E731
    max_nfe = 40
    r = loop.train_for(
        model, _BreakAt(model.parameters(), 3, stiffen), data, 60.0, name="sgd", lr=0.01, seed=0,
        batch_size=16, n_evals=10**6, loss_fn=mse, eval_fn=lambda *_: (math.nan, math.nan),
        train_eval_fn=lambda m: float(mse(m, data[0], data[1]).detach()), max_nfe=max_nfe,
    )  # fmt: skip
    assert r.extra.get("stalled") == 1.0 and "field evaluations" in r.error
    assert r.iterations == 3 and [p.iteration for p in r.points] == [0, 1, 2]
    cap = loop.SOLVE_CAP_FACTOR * max_nfe
    before = calls[0]
    assert not problem._forward_pre_hooks and len(model.ode.vf._forward_pre_hooks) == 1
    with torch.no_grad():
        model(data[0][:4])
    assert calls[0] - before > 10 * cap  # uncapped, the stiff solve takes far longer


@pytest.mark.parametrize("train_set", [False, True])
def test_train_for_logs_the_window_mean_and_the_training_set_loss(train_set):
    """Every point's ``window_loss`` is the mean of the minibatch losses since the previous
    point (recorded here as the loss function returns them); ``train_loss`` is that mean, or
    with ``train_eval_fn`` the loss on the training rows at that point (recomputed here from
    a copy of the model's weights taken as the point is logged), with a point at 0 s."""
    model, data = _linear_problem()
    seen: list[float] = []
    weights: list[torch.Tensor] = []

    def loss(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = torch.nn.functional.mse_loss(m(x), y)
        seen.append(float(value.detach()))
        return value

    def full(m: torch.nn.Module) -> float:
        weights.append(torch.cat([p.detach().flatten() for p in m.parameters()]).clone())
        return float(torch.nn.functional.mse_loss(m(data[0]), data[1]).detach())

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    r = loop.train_for(
        model, opt, data, math.inf, name="sgd", lr=0.05, seed=0, batch_size=16, loss_fn=loss,
        eval_fn=lambda *_: (math.nan, math.nan), train_eval_fn=full if train_set else None,
        max_iterations=9, eval_every=3,
    )  # fmt: skip
    points = r.points[1:] if train_set else r.points
    assert [p.iteration for p in points] == [3, 6, 9]
    for k, p in enumerate(points):
        assert p.window_loss == pytest.approx(sum(seen[3 * k : 3 * k + 3]) / 3, rel=1e-12)
    if not train_set:
        assert all(p.train_loss == p.window_loss for p in points)
        return
    assert r.points[0].seconds == 0.0 and math.isnan(r.points[0].window_loss)
    for p, w in zip(r.points, weights):
        fitted = data[0] @ w[:3] + w[3]
        assert p.train_loss == pytest.approx(float(((fitted - data[1][:, 0]) ** 2).mean()))
    assert points[-1].train_loss != pytest.approx(points[-1].window_loss)


def test_train_for_batch_seed_sets_the_minibatch_stream():
    seen: dict[int | None, list[torch.Tensor]] = {}
    for bs in (None, 7, 7):
        model, data = _linear_problem()
        batches: list[torch.Tensor] = []

        def loss(
            m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batches: list = batches
        ) -> torch.Tensor:
            batches.append(x)
            if len(batches) == 3:
                raise RuntimeError("stop")
            return torch.nn.functional.mse_loss(m(x), y)

        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loop.train_for(
            model, opt, data, 60.0, name="sgd", lr=0.01, seed=0, batch_size=8, loss_fn=loss,
            eval_fn=lambda *_: (0.0, 0.0), batch_seed=bs, catch_failures=True, keep_partial=True,
        )  # fmt: skip
        if bs in seen:
            assert all(torch.equal(a, b) for a, b in zip(seen[bs], batches))
        seen[bs] = batches
    assert not torch.equal(seen[None][0], seen[7][0])
    assert suite.batch_seed("digits", 0) != suite.batch_seed("mnist", 0)
    assert suite.batch_seed("digits", 0) != suite.batch_seed("digits", 1)


def test_run_trial_caps_the_final_test_solve(monkeypatch):
    """The test metric after a train-curve run is solved under the same cap as the run (an
    SGD run's final test evaluation on exploded weights sat in one solve for 23 minutes):
    with ``max_nfe = 1`` the flow map's dopri5 test solve exceeds its cap of 5 evaluations,
    and the run keeps its points with a NaN test metric and the cap's message."""
    from dataclasses import replace

    from torchdyn_snopt.bench import trial as trial_mod

    task = replace(TASKS["flowmap"], max_nfe=1)
    data = task.load()

    def no_training(model, optimizer, data, budget_s, **kw):
        r = RunResult(kw["name"], kw["lr"], kw["seed"])
        r.points.append(Point(0.0, 0, 1.0, math.nan, math.nan, math.nan))
        return r

    monkeypatch.setattr(trial_mod, "train_for", no_training)
    r = trial_mod.run_trial(
        trial_mod.Trial(task, "adam", 1e-3, 0, 1.0, protocol=trial_mod.TRAIN_CURVE), data
    )
    assert math.isnan(r.points[-1].test_loss) and "field evaluations" in r.error
    monkeypatch.setattr(trial_mod, "solve_cap", lambda *_: contextlib.nullcontext())
    r = trial_mod.run_trial(
        trial_mod.Trial(task, "adam", 1e-3, 0, 1.0, protocol=trial_mod.TRAIN_CURVE), data
    )
    assert math.isfinite(r.points[-1].test_loss) and not r.error
