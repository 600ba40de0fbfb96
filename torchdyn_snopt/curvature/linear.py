"""Adapter for ``nn.Linear``: ``h = W z + b``, rows are the leading dimensions flattened."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from torchdyn_snopt.curvature.base import WeightBiasAdapter, append_ones, grad_of


class LinearAdapter(WeightBiasAdapter):
    """``A`` over inputs ``[z, 1]``, ``B`` over output gradients; weight and bias as one matrix."""

    module: nn.Linear

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
