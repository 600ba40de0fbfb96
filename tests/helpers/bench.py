"""Checks shared by the bench smoke tests."""

from __future__ import annotations

import math
from typing import Any


def check_points_from_zero(runs: list[dict[str, Any]], positive: bool = True) -> None:
    """Each run (a bench JSON's ``runs`` entry) logs a first point at 0 s without a minibatch
    mean (``window_loss`` NaN), then points that carry it; with ``positive`` (losses that
    cannot be negative, unlike an NLL) both losses of those points are > 0, else the window
    mean is finite."""
    for run in runs:
        first, *rest = run["points"]
        assert first["seconds"] == 0.0 and math.isnan(first["window_loss"])
        if positive:
            assert rest and all(p["window_loss"] > 0 and p["train_loss"] > 0 for p in rest)
        else:
            assert rest and all(math.isfinite(p["window_loss"]) for p in rest)
