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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from torchdyn_snopt.curvature.base import LayerAdapter
from torchdyn_snopt.curvature.capture import replace_hook
from torchdyn_snopt.curvature.sampler import subsample
from torchdyn_snopt.curvature.source import CurvatureSource, Factors, RowMoments


@dataclass
class _LayerSums:
    """One outer layer's armed calls since the last :meth:`OuterFactors.take`: input rows
    ``z`` (for ``A``), output-gradient rows ``g`` (for ``B``), summed locations, and the raw
    input rows while ``A``'s rank may be below half its width (None once it cannot be)."""

    z: RowMoments = field(default_factory=RowMoments)
    g: RowMoments = field(default_factory=RowMoments)
    locations: int = 0
    kept: list[Tensor] | None = field(default_factory=list)


class OuterFactors(CurvatureSource):
    """The curvature source of the layers outside the ODEs: forward hooks on their modules
    (owned by this object, removed by :meth:`remove`); :meth:`take` returns and clears what
    the armed backward passes recorded."""

    def __init__(self, adapters: list[LayerAdapter]) -> None:
        self.adapters = adapters
        self.armed = False
        self._batch: dict[LayerAdapter, int] = {}
        self._sums: dict[LayerAdapter, _LayerSums] = {}
        self._handles: list[RemovableHandle] = [
            replace_hook(a.module, "outer", self._hook(a)) for a in adapters
        ]

    def arm(self, armed: bool) -> None:
        self.armed = armed

    def batch_size(self, adapter: LayerAdapter) -> int | None:
        return self._batch.get(adapter)

    def _hook(self, adapter: LayerAdapter) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            first = inputs[0]
            batch = first.shape[0] if first.dim() > 1 else 1
            self._batch[adapter] = batch
            if not (self.armed and torch.is_grad_enabled() and output.requires_grad):
                return
            with torch.no_grad():
                z = adapter.input_rows(subsample(inputs, adapter.locations(output)))
                sums = self._sums.setdefault(adapter, _LayerSums())
                sums.z.add(z)
                if sums.kept is not None:  # keep the rows while A's rank is below half its width
                    sums.kept = sums.kept + [z] if 2 * sums.z.rows <= z.shape[1] else None
                sums.locations += adapter.locations(output)  # weight shared over calls (GRU)

            def grad_hook(g: Tensor) -> None:
                with torch.no_grad():
                    sums.g.add(adapter.output_rows(g) * batch)

            output.register_hook(grad_hook)

        return hook

    def take(self, passes: int = 1) -> dict[LayerAdapter, Factors]:
        """Factors from the armed forward/backward passes (``passes`` of them since the last
        call: ``A`` and ``B`` are means over all their rows, the locations per pass), cleared
        afterwards (only complete ones)."""
        out = {}
        for adapter, s in self._sums.items():
            nz, ng = s.z.rows, s.g.rows
            if nz and ng:
                rows = torch.cat(s.kept) / math.sqrt(nz) if s.kept else None
                batch = self._batch.get(adapter, 1)
                A, B = s.z.total() / nz, s.g.total() / ng
                out[adapter] = Factors(A, B, max(s.locations // passes, 1), batch, rows)
        self._sums.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
