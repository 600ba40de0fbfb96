"""Forward hooks that record adapted layers' inputs and outputs only when asked to.

Hooks fire at every call of a module: every Runge-Kutta stage, rejected steps, extra passes of a
trace estimator. They therefore record nothing unless a :func:`recording` block is open; the
backward pass opens one only around the evaluations its quadrature intends (§3.2, Alg. 1 l.7).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from torchdyn_snopt.curvature.base import LayerAdapter

Record = tuple[LayerAdapter, tuple[Any, ...], Tensor]
_ACTIVE: list[list[Record]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[Record]]:
    """Collect ``(adapter, inputs, output)`` of every hooked module called inside the block."""
    records: list[Record] = []
    _ACTIVE.append(records)
    try:
        yield records
    finally:
        _ACTIVE.pop()


def attach(adapter: LayerAdapter) -> RemovableHandle:
    """Hook ``adapter.module`` so that open :func:`recording` blocks see its calls."""

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        if _ACTIVE:
            _ACTIVE[-1].append((adapter, inputs, output))

    return replace_hook(adapter.module, "_snopt_capture_hook", hook)


def replace_hook(module: nn.Module, key: str, hook: Any) -> RemovableHandle:
    """Register ``hook`` on ``module``, removing the one a previous optimizer left under ``key``
    (building a second SNOpt on the same model must not record every call twice)."""
    old = module.__dict__.get(key)
    if old is not None:
        old.remove()
    handle = module.register_forward_hook(hook)
    module.__dict__[key] = handle
    return handle
