"""``torchdyn-snopt bench scaling``: 1 vs 2 gloo processes side by side.

The spawned ranks get torchrun's environment and run the code torchrun's ranks run.
"""

from __future__ import annotations

import json

import pytest

from torchdyn_snopt.__main__ import main
from torchdyn_snopt.bench.scaling import ScalingConfig, bench_scaling

TINY = ["--iters", "2", "--warmup", "1", "--batch-size", "16", "--update-freq", "2"]


def _check(rows: list[dict]) -> None:
    one, two = rows
    assert (one["processes"], two["processes"]) == (1, 2)
    assert (one["backend"], two["backend"]) == ("-", "gloo")
    assert one["speedup"] == 1.0 and two["speedup"] > 0
    assert one["comm_share"] == 0.0 and one["grad_comm_ms"] == one["snopt_comm_ms"] == 0.0
    # 2 processes: DDP's gradient all-reduce and SNOpt's flag/factor all-reduces both timed.
    assert two["grad_comm_ms"] > 0 and two["snopt_comm_ms"] > 0 and 0 < two["comm_share"] < 1
    assert two["samples_per_s"] == pytest.approx(2 * 16 / two["s_per_iter"])
    assert one["nfe_per_iter"] > 0 and two["nfe_per_iter"] > 0


@pytest.mark.slow
def test_cli_times_one_and_two_processes_side_by_side(tmp_path, capsys):
    assert main(["bench", "scaling", "--world-sizes", "1,2", "--out", str(tmp_path), *TINY]) == 0
    table = capsys.readouterr().out
    assert "comm_share" in table and "gloo" in table
    _check(json.loads((tmp_path / "scaling.json").read_text())["rows"])


@pytest.mark.parametrize(
    "argv", [["--world-sizes", "0"], ["--world-sizes", "1,x"], ["--iters", "0"]]
)
def test_cli_rejects_bad_numbers(argv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "scaling", "--out", str(tmp_path), *argv])
    assert f"argument {argv[0]}" in capsys.readouterr().err
    assert not (tmp_path / "scaling.json").exists()


def test_bad_device_fails_before_spawning(tmp_path):
    with pytest.raises(ValueError, match="device='tpu'"):
        bench_scaling(device="tpu", out=tmp_path)
    with pytest.raises(ValueError, match="world_sizes"):
        bench_scaling(world_sizes=(), out=tmp_path)
    assert not (tmp_path / "scaling.json").exists()


def test_one_process_runs_here(tmp_path):
    cfg = ScalingConfig(iters=1, warmup=0, batch_size=8)
    (row,) = bench_scaling(world_sizes=(1,), cfg=cfg, out=None, quiet=True)
    assert row["processes"] == 1 and row["speedup"] == 1.0 and row["comm_share"] == 0.0
