"""Precision, seeds, tolerances and float64 solvers shared by the tests.

Solvers given by name to :func:`~tests.helpers.gradients.grads` are instantiated with a
float64 Butcher tableau. torchdyn builds name-given solvers with ``dtype=torch.float32``, so
their coefficients are float32-rounded even on a float64 state; with tolerances near 1e-10
the adaptive error estimate is then dominated by that rounding and the step count explodes
(tsit5 by name needs several seconds per solve). The by-name path itself is exercised in
``test_registration.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from torchdyn.numerics.solvers.ode import SOLVER_DICT

DTYPE = torch.float64
#: Seed of the builders' parameters (their data use ``SEED + 1``) and of every test's global
#: RNG (``tests/conftest.py``).
SEED = 0
#: Forward and adjoint tolerance used for adaptive solvers.
TOL = 1e-10
#: Maximum relative error tolerated between two gradient computations, per block (each
#: parameter tensor, x0, t_span against its own norm). Measured worst case over every
#: comparison that uses this default (adaptive solves at TOL against each other and against
#: autograd, rk4 on 41 points against torchdyn's adjoint or autograd): 2.0e-8 (a 2.bias block,
#: conv field, tsit5 vs autograd; rk4 save_at 0.weight 2.0e-8). Comparisons with a genuine
#: discretisation gap (rk4 on few points vs autograd, low-order adjoint solvers, NCDE paths with
#: kinks) pass their own, measured bound.
REL = 2e-7
#: Norm below which a block's error is measured absolutely (near-zero blocks).
ABS_FLOOR = 1e-12

ADAPTIVE = ("dopri5", "tsit5")
FIXED = ("euler", "midpoint", "rk4", "ieuler")


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Draws inside come from torch's global RNG seeded with ``seed``; the global RNG is
    restored afterwards (a builder's parameters depend on its seed alone, and it leaves the
    caller's random stream untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seeded(seed: int = SEED) -> None:
    """Seed torch's global RNG (for test code that draws from it on purpose)."""
    torch.manual_seed(seed)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: the tensors here are tiny, and with a second process busy on the
    machine's other core, torch's thread pool makes small convolutions ~10x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_solver(name: str) -> nn.Module:
    """A fresh solver instance whose tableau is float64."""
    return SOLVER_DICT[name](dtype=DTYPE)


def is_fixed(solver: str | nn.Module) -> bool:
    if isinstance(solver, str):
        return solver in FIXED
    return solver.stepping_class == "fixed"
