"""The Adam-vs-SNOpt digits demo and its command line."""

import math

import pytest

from torchdyn_snopt.__main__ import build_parser, main
from torchdyn_snopt.demo import minibatch_indices, run_demo


def _check_result(result: dict, name: str, iterations: int) -> None:
    assert result["optimizer"] == name
    assert result["iterations"] == iterations
    assert len(result["losses"]) == iterations
    assert all(math.isfinite(loss) for loss in result["losses"])
    assert math.isfinite(result["final_train_loss"])
    assert 0.0 <= result["final_test_accuracy"] <= 1.0
    assert all(0.0 <= h["test_accuracy"] <= 1.0 for h in result["history"])
    assert result["history"][-1]["iteration"] == iterations
    assert result["wall_clock_s"] > 0
    assert result["time_to_target_s"] is None or result["time_to_target_s"] > 0


@pytest.mark.filterwarnings("ignore:SNOpt has no Kronecker factors")
def test_run_demo_returns_both_optimizers(capsys):
    results = run_demo(iterations=6, quiet=True)
    assert set(results) == {"adam", "snopt"}
    for name, result in results.items():
        _check_result(result, name, 6)
    # Same initialisation and first minibatch: the first losses agree.
    assert results["adam"]["losses"][0] == pytest.approx(results["snopt"]["losses"][0], rel=1e-5)
    assert capsys.readouterr().out == ""


def test_minibatches_cover_each_epoch_once():
    batches = minibatch_indices(100, 30, 7, seed=0)
    assert len(batches) == 7 and all(len(b) == 30 for b in batches)
    for epoch in (batches[0:3], batches[3:6]):
        flat = [int(i) for b in epoch for i in b]
        assert len(set(flat)) == 90
    again = minibatch_indices(100, 30, 7, seed=0)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"iterations": 0},
        {"batch_size": 0},
        {"batch_size": 10_000},
        {"lr_snopt": 0.0},
        {"lr_adam": float("nan")},
    ],
)
def test_run_demo_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        run_demo(quiet=True, **kwargs)


@pytest.mark.filterwarnings("ignore:SNOpt has no Kronecker factors")
def test_cli_demo_smoke(capsys):
    assert main(["demo", "--iterations", "4", "--quiet"]) in (0, None)
    assert capsys.readouterr().out == ""


def test_cli_parses_demo_options():
    args = build_parser().parse_args(
        ["demo", "--iterations", "7", "--seed", "3", "--lr-snopt", "0.05", "--lr-adam", "1e-3"]
    )
    assert (args.command, args.iterations, args.seed) == ("demo", 7, 3)
    assert (args.lr_snopt, args.lr_adam, args.quiet) == (0.05, 1e-3, False)


@pytest.mark.parametrize(
    "argv", [[], ["demo", "--iterations", "0"], ["demo", "--lr-snopt", "-1"], ["nope"]]
)
def test_cli_rejects_bad_input(argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
