"""The CurvatureTap cost script measures what it says: its SNOpt variants arm the tap as named,
and the amortized figure is the stated average."""

import pytest

from torchdyn_snopt.bench.scripts import tap_overhead


def test_variants_arm_the_tap_as_named():
    weights = tap_overhead.TapCDE(13, 9, 32, 64).state_dict()
    for variant, freq in (("not_armed", 10**9), ("armed", 1)):
        model, opt = tap_overhead._make(variant, weights)
        assert opt.preconditioner.update_freq == freq
        assert model.func.sampler.request.adapters  # the optimizer bound the tap's layers
    model, opt = tap_overhead._make("adam", weights)
    assert not model.func.sampler.request.adapters  # plain torchcde


def test_amortized_is_the_refresh_weighted_average(monkeypatch):
    steps = {"adam": 2.0, "not_armed": 3.0, "armed": 13.0}
    order = iter(["adam", "not_armed", "armed"] * 4)
    monkeypatch.setattr(tap_overhead, "_step", lambda *a: steps[next(order)])
    t = tap_overhead.timing(reps=3, seed=0)
    k = tap_overhead.UPDATE_FREQ
    assert t["amortized"] == pytest.approx((13.0 + (k - 1) * 3.0) / k)
    assert (t["adam"], t["not_armed"], t["armed"]) == (2.0, 3.0, 13.0)


def _doc(amortized: float) -> dict:
    t = {"adam": 2.0, "not_armed": 2.2, "armed": 4.0, "amortized": amortized}
    return tap_overhead.document(t, {"reps": 3, "threads": 1, "seed": 0, "json": "x.json"})


def test_document_rows_and_target_line_by_hand():
    doc = _doc(2.38)
    assert tap_overhead.is_tap_overhead(doc)
    rows = {r["variant"]: r["x_adam"] for r in doc["summary"]}
    assert rows == pytest.approx({"adam": 1.0, "not_armed": 1.1, "armed": 2.0, "amortized": 1.19})
    line = tap_overhead.target_line(doc)
    assert "1.19× Adam's" in line and line.endswith("target ≤ 1.3×; met).")
    assert tap_overhead.target_line(_doc(2.8)).endswith("target ≤ 1.3×; missed).")  # 1.4×
    # the command that reproduces the run, without the output file
    command = doc["environment"]["command"]
    assert (
        command
        == "python -m torchdyn_snopt.bench.scripts.tap_overhead --reps 3 --threads 1 --seed 0"
    )
    page = tap_overhead.markdown(doc, "# tap_overhead")
    assert "| amortized | 2.38 | 1.19 |" in page and command in page
