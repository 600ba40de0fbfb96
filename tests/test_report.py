"""``torchdyn-snopt report``: pages and the README block come from the JSON, number for number."""

from __future__ import annotations

import json
import math

import pytest

from torchdyn_snopt.__main__ import main
from torchdyn_snopt.bench.report import BEGIN, END, curve_lines, replace_block
from torchdyn_snopt.bench.scripts import tap_overhead

ENV = {
    "command": "torchdyn-snopt bench suite --seeds 3",
    "date": "2026-01-01T00:00:00",
    "machine": {"cpu": "Test CPU", "cpu_count": 2, "torch_threads": 1, "platform": "Linux"},
    "versions": {"torch": "2.14.1", "torchdyn": "1.0.6"},
}


def _row(opt: str, loss: float, x: float, **kw) -> dict:
    return {
        "optimizer": opt,
        "lr": 0.01,
        "lr_source": "sweep",
        "final_train_loss": loss,
        "test_mse": loss * 2,
        "s_to_adam_loss": 1.0,
        "x_adam_time": x,
        "reached": 3,
        "diverged": kw.get("diverged", 0),
        "stalled": 0,
        "s_per_iter": 0.01,
        "nfe_forward": 20.0,
        "nfe_backward": 30.0,
    }


def _suite(tmp_path):
    run = tmp_path / "suite_run"
    run.mkdir()
    doc = {
        **ENV,
        "elapsed_s": 120.0,
        "machine": {**ENV["machine"], "load_average_at_start": [0.1, 0.1, 0.1]},
        "settings": {
            "budget_s": 12.0,
            "seeds": 3,
            "n_evals": 24,
            "stall_fraction": 0.9,
            "snopt_default": "SNOpt(model)",
        },
        "tasks": {"flowmap": {"description": "pendulum time-1 map", "metric": "mse"}},
        "summary": {
            "flowmap": [
                _row("adam", 0.00123456, 1.0),
                _row("snopt-default", 0.000987654, 0.42),
                _row("soap", 0.5, math.inf, diverged=1),
            ]
        },
        "overall": {
            "winners": {"flowmap": "snopt-default"},
            "median_x_adam_time": {"snopt-default": 0.42, "soap": math.inf},
            "wins": {"snopt-default": 1, "soap": 0},
        },
    }
    (run / "suite.json").write_text(json.dumps(doc))
    (run / "suite.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return run


def test_report_writes_pages_and_the_readme_block_from_the_json(tmp_path):
    run = _suite(tmp_path)
    (tmp_path / "image_digits_density.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    bench = tmp_path / "image_digits.json"
    bench.write_text(
        json.dumps({"environment": ENV, "summary": [{"optimizer": "adam", "final_acc": 0.98765}]})
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BEGIN}\nold numbers\n{END}\n\n## after\n")
    out = tmp_path / "pages"
    assert main(["report", str(run), str(bench), "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# title") and "## after" in text
    line = next(v for v in text.splitlines() if v.startswith("| flowmap"))
    # final training losses as in the JSON (4 significant digits), ratios to Adam's time
    assert "0.001235" in line and "0.0009877 (0.42×)" in line and "0.5 (never) [1 failed]" in line
    assert "snopt-default" in line.split("|")[-2]  # the winner
    assert "torchdyn-snopt bench suite --seeds 3" in text and "Test CPU" in text
    page = (out / "suite_run.md").read_text()
    assert "## flowmap" in page and "pendulum time-1 map" in page and "0.001235" in page
    assert (out / "suite_run.png").is_file()
    digits = (out / "image_digits.md").read_text()
    assert "0.9877" in digits and "2026-01-01" in digits
    assert "(image_digits_density.png)" in digits and (out / "image_digits_density.png").is_file()
    assert "[suite_run](suite_run.md)" in (out / "index.md").read_text()


def test_report_refuses_a_readme_without_the_block_and_missing_runs(tmp_path):
    with pytest.raises(ValueError, match="no results block"):
        replace_block("# no markers\n", "table")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def _suite_with_costs(tmp_path):
    """Two tasks: snopt-default at 1.2x Adam's s/iter on flowmap (the same evaluation counts),
    1.5x on spiral, where its solves take 250 field evaluations per iteration to Adam's 200, so
    1.5 * 200 / 250 = 1.2x per evaluation."""
    run = _suite(tmp_path)
    doc = json.loads((run / "suite.json").read_text())
    rows = doc["summary"]["flowmap"]
    rows[0]["s_per_iter"], rows[1]["s_per_iter"] = 0.02, 0.024
    doc["summary"]["spiral"] = [_row("adam", 0.3, 1.0), _row("snopt-default", 0.2, 0.5)]
    doc["summary"]["spiral"][0] |= {"s_per_iter": 0.1, "nfe_forward": 110, "nfe_backward": 90}
    doc["summary"]["spiral"][1] |= {"s_per_iter": 0.15, "nfe_forward": 130, "nfe_backward": 120}
    doc["tasks"]["spiral"] = {"description": "two spirals", "metric": "mse"}
    doc["overall"]["winners"]["spiral"] = "snopt-default"
    (run / "suite.json").write_text(json.dumps(doc))
    return run


def _usable(low: float, high: float, count: int) -> dict:
    return {"best_lr": low, "best_loss": 0.1, "low": low, "high": high,
            "ratio": high / low, "count": count}  # fmt: skip


def _sensitivity(tmp_path):
    """An lr_sensitivity.json on two 5-rate grids: on flowmap snopt-default is usable over
    0.002-0.2 (the whole grid: 100x, at both ends), Adam over 0.01-0.1 (10x); on spiral
    snopt-default over 0.002-0.02 (10x, short of 30x) and Adam has no usable rate."""
    run = tmp_path / "sens_run"
    run.mkdir()
    doc = {
        **ENV,
        "command": "torchdyn-snopt bench suite --lr-sensitivity --grid-budget-s 4",
        "settings": {"mode": "lr-sensitivity", "budget_s": 4.0},
        "grid": {
            "adam": [0.001, 0.00316, 0.01, 0.0316, 0.1],
            "snopt-default": [0.002, 0.00632, 0.02, 0.0632, 0.2],
        },
        "sensitivity": {
            "flowmap": {"adam": _usable(0.01, 0.1, 3), "snopt-default": _usable(0.002, 0.2, 5)},
            "spiral": {
                "adam": _usable(math.nan, math.nan, 0) | {"ratio": math.nan},
                "snopt-default": _usable(0.002, 0.02, 3),
            },  # fmt: skip
        },
    }
    (run / "lr_sensitivity.json").write_text(json.dumps(doc))
    return run, doc


def test_cost_and_range_tables_from_the_json(tmp_path):
    from torchdyn_snopt.bench import suite_report as sr

    suite_doc = json.loads((_suite_with_costs(tmp_path) / "suite.json").read_text())
    cost = sr.cost_rows(suite_doc)
    assert [r["task"] for r in cost] == ["flowmap", "spiral"]
    assert [r["x adam"] for r in cost] == [pytest.approx(1.2), pytest.approx(1.5)]
    assert [r["<= 1.3x"] for r in cost] == ["yes", "NO"]
    # per field evaluation: flowmap's solves take 50 evaluations for both, spiral's 250 to 200
    assert [r["x adam per evaluation"] for r in cost] == [pytest.approx(1.2)] * 2
    for row in suite_doc["summary"]["flowmap"]:  # a run file without the counts
        del row["nfe_forward"], row["nfe_backward"]
    assert math.isnan(sr.cost_rows(suite_doc)[0]["x adam per evaluation"])
    _, sens = _sensitivity(tmp_path)
    rows = {r["task"]: r for r in sr.range_rows(sens)}
    flow, spiral = rows["flowmap"], rows["spiral"]
    assert flow["snopt-default usable lr"] == "0.002 – 0.2"
    assert flow["snopt-default high/low"] == "≥100×"  # reaches both grid ends
    assert (flow["adam usable lr"], flow["adam high/low"]) == ("0.01 – 0.1", "≥10×")
    assert flow["snopt-default >= 30x"] == "yes"
    assert spiral["snopt-default high/low"] == "≥10×" and spiral["snopt-default >= 30x"] == "NO"
    assert (spiral["adam usable lr"], spiral["adam high/low"]) == ("none", "-")
    # a gap: 3 usable rates but 0.00632 inside 0.002-0.0632 was not, so even 31.6x misses
    gap = {**sens, "sensitivity": {"t": {"snopt-default": _usable(0.002, 0.0632, 3)}}}
    (row,) = sr.range_rows(gap)
    assert row["snopt-default usable lr"] == "0.002 – 0.0632 (1 unusable inside)"
    assert row["snopt-default high/low"] == "≥31.6×" and row["snopt-default >= 30x"] == "NO"
    assert row["adam usable lr"] == "not run"
    # a grid run without snopt-default (e.g. --sweep) gives no range table
    assert sr.range_rows({**sens, "sensitivity": {"t": {"adam": _usable(0.01, 0.1, 3)}}}) == []


def test_report_adds_the_target_lines_and_tables(tmp_path):
    run = _suite_with_costs(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{BEGIN}\nold\n{END}\n")
    out = tmp_path / "pages"
    assert main(["report", str(run), "--out", str(out), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert (
        "snopt-default's seconds per iteration: 1.2× to 1.5× adam's over 2 tasks "
        "(target ≤ 1.3×; above it on spiral 1.5×). Per field evaluation (the solves' NFE "
        "divided out): spiral 1.2×." in text
    )
    assert "Usable learning-rate range" not in text  # no sensitivity run: no line, no table
    page = (out / "suite_run.md").read_text()
    assert "## Cost per iteration: snopt-default against adam" in page
    assert "| spiral | 0.1 | 0.15 | 1.5 | NO | 1.2 |" in page
    assert "## Usable learning rates" not in page

    sens_run, _ = _sensitivity(tmp_path)
    tap = tmp_path / "tap_overhead.json"  # the CurvatureTap route: 2.2/2 = 1.1x Adam's
    times = {"adam": 2.0, "not_armed": 2.1, "armed": 3.0, "amortized": 2.2}
    tap.write_text(json.dumps(tap_overhead.document(times, {"reps": 3, "threads": 1, "seed": 0})))
    argv = ["report", str(run), str(sens_run), str(tap), "--out", str(out)]
    assert main([*argv, "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert (
        "Usable learning-rate range (high/low, final loss within 2× of the best, no failure): "
        "snopt-default 10× to 100×; adam 10× to 10× (target for snopt-default ≥ 30×; missed "
        "on spiral)." in text
    )
    assert "batch 128): amortized seconds per iteration 1.1× Adam's" in text
    assert "| amortized | 2.2 | 1.1 |" in (out / "tap_overhead.md").read_text()
    for page in (out / "suite_run.md", out / "sens_run.md"):
        md = page.read_text()
        assert "## Usable learning rates: snopt-default and adam" in md
        assert "| flowmap | 0.002 – 0.2 | ≥100× | 0.01 – 0.1 | ≥10× | yes |" in md
        assert "| spiral | 0.002 – 0.02 | ≥10× | none | - | NO |" in md
        assert "--lr-sensitivity --grid-budget-s 4" in md


def _cost_row(field: str, width: int, armed: dict[str, float], amortized: dict[str, float]) -> dict:
    row = {"field": field, "width": width, "adam_s": 0.1, "not_armed_ratio": 0.9}
    row["not_armed_power_ratio"] = 0.9
    for refresh in ("exact", "power"):
        row[f"armed_{refresh}_ratio"] = armed[refresh]
        row[f"amortized_{refresh}_ratio"] = amortized[refresh]
        row[f"refresh_{refresh}_s"] = 0.01
        row[f"memory_bytes_{refresh}"] = 1000
    return row


def test_refresh_cost_page_checks_each_target_against_the_rows(tmp_path):
    rows = [
        _cost_row("mlp", 1024, {"exact": 3.0, "power": 1.2}, {"exact": 1.05, "power": 1.15}),
        _cost_row("mlp", 2048, {"exact": 11.0, "power": 1.48}, {"exact": 2.0, "power": 1.09}),
        _cost_row("conv", 256, {"exact": 1.6, "power": 1.12}, {"exact": 1.02, "power": 1.01}),
    ]
    cfg = {"threads": 1, "tol": 0.001, "repeats": 3, "update_freq": 10, "mlp_field": "32 -> w"}
    run = tmp_path / "refresh_cost.json"
    run.write_text(json.dumps({"environment": ENV, "config": cfg, "summary": rows}))
    assert main(["report", str(run), "--out", str(tmp_path / "pages")]) == 0
    page = (tmp_path / "pages" / "refresh_cost.md").read_text()
    lines = page.splitlines()

    def target(name: str) -> str:
        return next(v for v in lines if v.startswith(f"| {name} |"))

    # the bound is met by power (1.48 <= 1.5) and missed by exact (11 > 1.5)
    assert "| 11x NO | 1.48x |" in target("armed mlp at 2048")
    assert "| 1.6x NO | 1.12x |" in target("armed conv at 256")
    # every-width target: the worst width is named (exact at 2048, power at 1024)
    assert "| 2x (at 2048) NO | 1.15x (at 1024) NO |" in target("amortized mlp at every size")
    assert "| 1.02x (at 256) | 1.01x (at 256) |" in target("amortized conv at every size")
    assert not any("at 4096" in v for v in lines)  # not measured: no row
    assert "| mlp | 2048 | 0.1 | 0.9 | 0.9 | 11 | 1.48 |" in page
    assert "update_freq 10" in page and "Test CPU" in page


def test_committed_pages_and_readme_block_are_what_report_writes(tmp_path):
    """The README's results block and every page under docs/results are the report command's
    output on the committed run files (``torchdyn-snopt report docs/results/*/ ...``): a number
    edited by hand, or a page left behind after its JSON changed, fails here."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    results = root / "docs" / "results"
    runs = sorted(p for p in results.iterdir() if p.is_dir())
    readme = tmp_path / "README.md"
    readme.write_text((root / "README.md").read_text())
    out = tmp_path / "pages"
    assert main(["report", *map(str, runs), "--out", str(out), "--readme", str(readme)]) == 0
    assert readme.read_text() == (root / "README.md").read_text()
    pages = sorted(p.name for p in out.glob("*.md"))
    assert pages == sorted(p.name for p in results.glob("*.md"))
    for name in pages:
        assert (out / name).read_text() == (results / name).read_text(), name


def test_curve_line_counts_the_points_below_adams_by_hand():
    """Seed 0: snopt below at 2 of 3 evaluations after 0 s (the shared 0-s point is not
    counted; equal is not below); seed 1 has no Adam run and is left out. The window mean,
    where it differs from the logged loss, is counted the same way."""

    def run(opt: str, seed: int, losses: list[float], windows: list[float]) -> dict:
        pts = [
            {"seconds": float(i), "train_loss": v, "window_loss": w}
            for i, (v, w) in enumerate(zip(losses, windows))
        ]
        return {"optimizer": opt, "seed": seed, "points": pts}

    nan = math.nan
    runs = [
        run("adam", 0, [2.0, 1.0, 0.5, 0.2], [nan, 1.5, 0.7, 0.3]),
        run("snopt", 0, [2.0, 0.5, 0.5, 0.1], [nan, 1.6, 0.6, 0.2]),
        run("sgd", 0, [2.0, 0.1, 0.1, 0.1], [nan, 0.1, 0.1, 0.1]),
        run("snopt", 1, [2.0, 0.1, 0.1, 0.1], [nan, 0.1, 0.1, 0.1]),
    ]
    (line,) = curve_lines(runs)
    assert "training-set loss below adam's" in line and "at 2 of 3 evaluations" in line
    assert line.endswith("below adam's at 2 of 3.")
    minibatch = [run(r["optimizer"], r["seed"], [2.0, 1.0, 0.4, 0.3], [nan, 1.0, 0.4, 0.3])
                 for r in runs[:2]]  # fmt: skip
    minibatch[1]["points"][2]["train_loss"] = minibatch[1]["points"][2]["window_loss"] = 0.3
    (line,) = curve_lines(minibatch)
    assert "training loss (minibatch mean) below adam's" in line and "1 of 3" in line
    assert "mean minibatch loss" not in line
    assert curve_lines([runs[0], runs[2]]) == []


def test_table_cells_keep_four_digits_or_a_whole_number():
    from torchdyn_snopt.bench.records import fmt

    assert [fmt(v) for v in (0.000123456, 1.23456, 9999.4, 12345.6, 9999999.0)] == [
        "0.0001235", "1.235", "9999", "12346", "9999999"]  # fmt: skip
    # a diverged run's loss: exponent notation, not a 30-digit integer
    assert fmt(8.88394e29) == "8.884e+29" and fmt(-2.5e12) == "-2.5e+12"
    assert (fmt(math.nan), fmt(math.inf), fmt(3)) == ("-", "never", "3")


def test_footer_names_the_program_without_its_folder():
    from torchdyn_snopt.bench.provenance import footer, short_command

    assert short_command("/w/.venv/bin/torchdyn-snopt bench cnf --seeds 3") == (
        "torchdyn-snopt bench cnf --seeds 3"
    )
    assert short_command("python -m torchdyn_snopt.bench.scripts.x") == (
        "python -m torchdyn_snopt.bench.scripts.x"
    )
    # `python -m torchdyn_snopt bench ...`: sys.argv[0] is the package's __main__.py
    assert short_command("/w/src/torchdyn_snopt/__main__.py bench image --quiet") == (
        "python -m torchdyn_snopt bench image --quiet"
    )
    assert short_command("__main__.py bench cnf") == "python -m torchdyn_snopt bench cnf"
    line = footer({**ENV, "command": "/usr/local/bin/torchdyn-snopt bench image"})
    assert line.startswith("_`torchdyn-snopt bench image` on 2026-01-01")
