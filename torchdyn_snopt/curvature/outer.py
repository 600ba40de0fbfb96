"""Ordinary K-FAC factors for layers outside the ODEs (``full_precond=True``).

These layers (feature extractor, head, a recurrent cell) run outside the solver, so the usual
backward gives their factors directly: ``A = E[z̃ z̃ᵀ]`` from a forward hook and ``B = E[g gᵀ]`` with
``g = batch · ∂L/∂h`` from a tensor hook on the output (per-sample scale, as inside the ODEs).
The hooks only record while :attr:`OuterFactors.armed` is set and gradients are enabled.
``A`` uses at most :data:`~torchdyn_snopt.curvature.sampler.A_ROWS` input rows (samples ×
locations) per call, as inside the ODEs, ``B`` the whole batch: unfolding every patch of a
28×28 batch was most of an armed iteration's extra cost (MNIST bench: the second convolution's
25,088 × 257 rows took 78 ms to build and square; with 2,156 rows of 11 images the final test
accuracy over 3 seeds was 0.973, vs 0.971 with every row).

A layer called several times in one forward pass (a recurrent cell at every time step) shares
its weight over the calls like a convolution over locations: ``A`` and ``B`` are means over all
calls' rows and :attr:`Factors.locations` is the sum of the calls' locations (``T`` steps of a
cell), so ``L·λ_B λ_Aᵀ`` is on the scale of the summed gradient's second moment (K-FAC with
weight sharing, Grosse & Martens 2016; the in-ODE sampler counts repeated calls the same way).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from torchdyn_snopt.curvature.base import LayerAdapter
from torchdyn_snopt.curvature.capture import replace_hook
from torchdyn_snopt.curvature.sampler import Factors, subsample


class OuterFactors:
    """Hooks on outer layers; :meth:`take` returns and clears what the last backward recorded."""

    def __init__(self, adapters: list[LayerAdapter]) -> None:
        self.adapters = adapters
        self.armed = False
        self.batch_size: dict[LayerAdapter, int] = {}
        self._sums: dict[LayerAdapter, list[Any]] = {}
        self._handles: list[RemovableHandle] = [
            replace_hook(a.module, "_snopt_outer_hook", self._hook(a)) for a in adapters
        ]

    def _hook(self, adapter: LayerAdapter) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            first = inputs[0]
            batch = first.shape[0] if first.dim() > 1 else 1
            self.batch_size[adapter] = batch
            if not (self.armed and torch.is_grad_enabled() and output.requires_grad):
                return
            with torch.no_grad():
                z = adapter.input_rows(subsample(inputs, adapter.locations(output)))
                entry = self._sums.setdefault(adapter, [0.0, 0, 0.0, 0, 0, []])
                entry[0] = entry[0] + z.t() @ z
                entry[1] += z.shape[0]
                if entry[5] is not None:  # keep the rows while A's rank is below half its width
                    entry[5] = entry[5] + [z] if 2 * entry[1] <= z.shape[1] else None
                entry[4] += adapter.locations(output)  # weight shared over calls (GRU steps)

            def grad_hook(g: Tensor) -> None:
                with torch.no_grad():
                    rows = adapter.output_rows(g) * batch
                    entry[2] = entry[2] + rows.t() @ rows
                    entry[3] += rows.shape[0]

            output.register_hook(grad_hook)

        return hook

    def take(self, passes: int = 1) -> dict[LayerAdapter, Factors]:
        """Factors from the armed forward/backward passes (``passes`` of them since the last
        call: ``A`` and ``B`` are means over all their rows, the locations per pass), cleared
        afterwards (only complete ones)."""
        out = {}
        for adapter, (zz, nz, gg, ng, loc, zs) in self._sums.items():
            if nz and ng:
                rows = torch.cat(zs) / math.sqrt(nz) if zs else None
                batch = self.batch_size.get(adapter, 1)
                out[adapter] = Factors(zz / nz, gg / ng, max(loc // passes, 1), batch, rows)
        self._sums.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
