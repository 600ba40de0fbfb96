"""Adapter for the two affine maps of :class:`torchdyn_snopt.nn.GRUCell`.

Each :class:`~torchdyn_snopt.nn.GatePreactivation` is ``h = W z + b`` with ``W`` of shape
``(3H, d_in)``: ``A = E[z̃ z̃ᵀ]`` over its input (``x`` for ``weight_ih``, the previous hidden
state for ``weight_hh``; ``z̃ = [z, 1]`` with a bias) and ``B = E[g gᵀ]`` over the gradient at
the three gates' pre-activations (``3H``), every call of the cell (every time step) one row
(K-FAC for recurrent layers, shared weights over time); the factors' ``locations`` count the
calls, as a convolution's count its spatial positions (:mod:`~torchdyn_snopt.curvature.outer`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from torchdyn_snopt.curvature.base import LayerAdapter, append_ones, grad_of
from torchdyn_snopt.nn.gru import GatePreactivation


class GatePreactivationAdapter(LayerAdapter):
    """Weight and bias of one gate map as one ``(3H, d_in + 1)`` matrix."""

    module: GatePreactivation

    def params(self) -> list[nn.Parameter]:
        m = self.module
        return [m.weight] + ([m.bias] if m.bias is not None else [])

    def input_rows(self, inputs: tuple[Any, ...]) -> Tensor:
        z = inputs[0].reshape(-1, self.module.in_features)
        return append_ones(z) if self.module.bias is not None else z

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, self.module.out_features)

    def grad_matrix(self) -> Tensor:
        m = self.module
        if m.bias is None:
            return grad_of(m.weight)
        return torch.cat([grad_of(m.weight), grad_of(m.bias)[:, None]], dim=1)

    def set_grad_matrix(self, matrix: Tensor) -> None:
        m = self.module
        grad_of(m.weight).copy_(matrix[:, : m.in_features])
        if m.bias is not None:
            grad_of(m.bias).copy_(matrix[:, -1])

    def param_matrix(self) -> Tensor:
        m = self.module
        if m.bias is None:
            return m.weight.detach()
        return torch.cat([m.weight.detach(), m.bias.detach()[:, None]], dim=1)
