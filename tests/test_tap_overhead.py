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
