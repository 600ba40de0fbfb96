"""Forward hooks that record adapted layers' inputs and outputs only when asked to.

Hooks fire at every call of a module: every Runge-Kutta stage, rejected steps, extra passes of a
trace estimator. A :class:`Recorder`'s hooks therefore record nothing unless one of its
:meth:`Recorder.recording` blocks is open; the backward pass opens one only around the
evaluations its quadrature intends (§3.2, Alg. 1 l.7).

Ownership: one ``SNOptPreconditioner`` owns one :class:`Recorder` (the hooks on its in-ODE
layers) and hands it to its curvature sources in their requests. Each hooked module holds at
most one hook per kind: :func:`replace_hook` keeps the handles in a registry keyed by a weak
reference to the module (nothing is stored on the module), so building a second optimizer on
the same model replaces the first one's hooks instead of recording every call twice.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from torchdyn_snopt.curvature.base import LayerAdapter

#: ``(adapter, inputs, output)`` of one call of a hooked module.
Record = tuple[LayerAdapter, tuple[Any, ...], Tensor]
Hook = Callable[[nn.Module, tuple[Any, ...], Tensor], None]

#: module -> {hook kind: handle}; entries vanish with their module.
_HOOKS: weakref.WeakKeyDictionary[nn.Module, dict[str, RemovableHandle]] = (
    weakref.WeakKeyDictionary()
)


class Recorder:
    """Forward hooks on ``adapters``' modules that report to this recorder's open blocks.

    Args:
        adapters: the layers to hook (the in-ODE layers of one preconditioner).
    """

    def __init__(self, adapters: list[LayerAdapter]) -> None:
        self._open: list[list[Record]] = []
        self._handles = [replace_hook(a.module, "capture", self._hook(a)) for a in adapters]

    def _hook(self, adapter: LayerAdapter) -> Hook:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            if self._open:
                self._open[-1].append((adapter, inputs, output))

        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[Record]]:
        """Collect ``(adapter, inputs, output)`` of every hooked call inside the block."""
        records: list[Record] = []
        self._open.append(records)
        try:
            yield records
        finally:
            self._open.pop()

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def replace_hook(module: nn.Module, kind: str, hook: Hook) -> RemovableHandle:
    """Register the forward ``hook`` on ``module``, removing the one of the same ``kind`` a
    previous optimizer left there (see the module docstring)."""
    hooks = _HOOKS.setdefault(module, {})
    old = hooks.get(kind)
    if old is not None:
        old.remove()
    handle = module.register_forward_hook(hook)
    hooks[kind] = handle
    return handle
