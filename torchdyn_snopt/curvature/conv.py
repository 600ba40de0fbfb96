"""Adapter for ``nn.Conv2d`` (Grosse & Martens 2016, KFC).

``A`` is the second moment of unfolded input patches (``C_in·kh·kw`` plus 1 for the bias)
over batch × output locations, ``B`` that of the ``C_out`` output gradients over the same
rows, so factor sizes depend on channels and kernel size, not on the feature-map size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from torchdyn_snopt.curvature.base import WeightBiasAdapter, append_ones, grad_of


def conv_padding(module: nn.Conv2d) -> tuple[int, int]:
    """Integer padding of a zero-padded conv; ``NotImplementedError`` for what KFC can't view."""
    if module.groups != 1 or module.padding_mode != "zeros":
        raise NotImplementedError("grouped or non-zero-padded convolutions have no adapter")
    pad = module.padding
    if pad == "valid":
        return (0, 0)
    if pad == "same":
        out = []
        for k, d in zip(module.kernel_size, module.dilation):
            if (d * (k - 1)) % 2:
                raise NotImplementedError("padding='same' with an even effective kernel")
            out.append(d * (k - 1) // 2)
        return (out[0], out[1])
    return (int(pad[0]), int(pad[1]))


def unfold_patches(x: Tensor, module: nn.Conv2d, padding: tuple[int, int]) -> Tensor:
    """Patches of ``x`` as rows ``(N·L, C_in·kh·kw)``."""
    cols = F.unfold(
        x,
        module.kernel_size,
        dilation=module.dilation,
        padding=padding,
        stride=module.stride,
    )
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def channel_rows(grad_output: Tensor) -> Tensor:
    """``(N, C, H, W)`` → rows ``(N·H·W, C)``."""
    return grad_output.permute(0, 2, 3, 1).reshape(-1, grad_output.shape[1])


class Conv2dAdapter(WeightBiasAdapter):
    """KFC factors for a 2-D convolution; weight ``(C_out, C_in, kh, kw)`` flattened per row."""

    thin_bases = False  # see LayerAdapter.thin_bases

    module: nn.Conv2d

    def __init__(self, module: nn.Conv2d, name: str) -> None:
        super().__init__(module, name)
        self._padding = conv_padding(module)

    def input_rows(self, inputs: tuple[Any, ...]) -> Tensor:
        rows = unfold_patches(inputs[0], self.module, self._padding)
        return append_ones(rows) if self.module.bias is not None else rows

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return channel_rows(grad_output)

    def locations(self, output: Tensor) -> int:
        return output.shape[-1] * output.shape[-2]

    def grad_matrix(self) -> Tensor:
        m = self.module
        w = grad_of(m.weight).reshape(m.out_channels, -1)
        return w if m.bias is None else torch.cat([w, grad_of(m.bias)[:, None]], dim=1)

    def set_grad_matrix(self, matrix: Tensor) -> None:
        m = self.module
        n = m.weight[0].numel()
        grad_of(m.weight).copy_(matrix[:, :n].reshape_as(m.weight))
        if m.bias is not None:
            grad_of(m.bias).copy_(matrix[:, -1])

    def param_matrix(self) -> Tensor:
        m = self.module
        w = m.weight.detach().reshape(m.out_channels, -1)
        return w if m.bias is None else torch.cat([w, m.bias.detach()[:, None]], dim=1)
