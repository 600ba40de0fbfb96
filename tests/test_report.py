"""``torchdyn-snopt report``: pages and the README block come from the JSON, number for number."""

from __future__ import annotations

import json
import math

import pytest

from torchdyn_snopt.__main__ import main
from torchdyn_snopt.bench.report import BEGIN, END, replace_block

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
    assert "[suite_run](suite_run.md)" in (out / "index.md").read_text()


def test_report_refuses_a_readme_without_the_block_and_missing_runs(tmp_path):
    with pytest.raises(ValueError, match="no results block"):
        replace_block("# no markers\n", "table")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
