"""Helpers of the tests, one concern per module.

- :mod:`~tests.helpers.numerics`: dtype, seeds, tolerances, float64 solvers, thread and dtype
  contexts;
- :mod:`~tests.helpers.models`: vector fields and models, each built from an explicit seed;
- :mod:`~tests.helpers.data`: inputs, time grids, labelled sets, irregular series (explicit
  seeds, own generators);
- :mod:`~tests.helpers.gradients`: trajectory losses, gradient blocks and their comparison;
- :mod:`~tests.helpers.reference`: RK4/autograd ground truths and the second-order cases;
- :mod:`~tests.helpers.training`: a fixed training loop;
- :mod:`~tests.helpers.distributed`: gloo groups, child-process environment, spawn.

Pytest fixtures built on them live in ``tests/conftest.py``.
"""
