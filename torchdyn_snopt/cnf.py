"""Continuous normalizing flows (torchdyn's ``CNF``) under the snopt sensitivity.

A CNF integrates the augmented state ``[Δ, x]`` with ``dx/dt = f(t, x)`` and
``dΔ/dt = -tr(∂f/∂x)`` (FFJORD; the paper's augmented state of §4), so the adjoint of ``Δ``
enters the backward solve like any other state. Two things need care:

- **Noise.** A stochastic trace estimator (Hutchinson) must see the same noise in the
  forward solve and in its backward solve; torchdyn draws ``module.noise`` at every
  ``NeuralODE`` call, so a second call before ``backward()`` would change it. The adjoint
  snapshots the noise of every CNF at forward time (:func:`noise_snapshot`) and reinstates
  it for its backward solve (:func:`pinned_noise`).
- **Curvature.** The Kronecker factors (eq. 13) come from the vector field's own evaluation
  ``f(t, x)``: inside :func:`without_trace` every CNF returns a zero trace, so neither the
  trace estimator's passes through the network nor the ``Δ`` path of the VJP reach ``A_n``,
  ``B_n`` (and the curvature evaluation skips the trace's cost).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.nn as nn
from torch import Tensor

# torchdyn's CNF modules are untyped: Any lets us set their ``noise``/``trace_estimator``.
NoiseSnapshot = list[tuple[Any, Tensor | None]]


def trace_modules(module: nn.Module) -> list[Any]:
    """Submodules that carry a ``trace_estimator`` (torchdyn's own test for a CNF)."""
    return [m for m in module.modules() if hasattr(m, "trace_estimator")]


def noise_snapshot(module: nn.Module) -> NoiseSnapshot:
    """The current ``noise`` tensor of every CNF inside ``module`` (``None`` where unset)."""
    return [(m, getattr(m, "noise", None)) for m in trace_modules(module)]


@contextlib.contextmanager
def pinned_noise(snapshot: NoiseSnapshot) -> Iterator[None]:
    """Reinstate the noise of ``snapshot`` for the block; the current noise afterwards."""
    current = [(m, getattr(m, "noise", None)) for m, _ in snapshot]
    for m, noise in snapshot:
        m.noise = noise
    try:
        yield
    finally:
        for m, noise in current:
            m.noise = noise


def _zero_trace(x_out: Tensor, x_in: Tensor, **_: object) -> Tensor:
    """A trace estimator that returns zeros of shape ``(batch,)`` and touches no graph."""
    return x_out.new_zeros(x_out.shape[0])


@contextlib.contextmanager
def without_trace(module: nn.Module) -> Iterator[None]:
    """Every CNF inside ``module`` computes only ``f(t, x)`` (its trace entry is 0) in the block."""
    mods = trace_modules(module)
    saved = [m.__dict__.get("trace_estimator") for m in mods]
    for m in mods:
        m.trace_estimator = _zero_trace
    try:
        yield
    finally:
        for m, est in zip(mods, saved):
            m.trace_estimator = est
