"""Fixtures shared by every test: an explicitly seeded global RNG, one intra-op thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.helpers.numerics import SEED, single_thread


@pytest.fixture(autouse=True)
def _seeded_global_rng() -> Iterator[None]:
    """Every test starts from torch's global RNG seeded with :data:`SEED` (so what a test draws
    from it does not depend on the tests before it) and leaves it as it found it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test (see :func:`~tests.helpers.numerics.single_thread`)."""
    with single_thread():
        yield
