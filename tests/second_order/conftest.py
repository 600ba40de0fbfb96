"""The second-order tests run on one intra-op thread (tiny tensors, shared cores)."""

import pytest

from tests.fixtures import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield
