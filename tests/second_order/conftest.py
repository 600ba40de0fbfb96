"""The second-order tests run on one intra-op thread (tiny tensors, shared cores)."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield
