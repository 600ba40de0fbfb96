"""Adapters for torchdyn's Galerkin layers ``GalLinear`` and ``GalConv2d``.

A Galerkin layer's weights are ``w(t) = Σ_k φ_k(t) c_k``: the coefficients act linearly on
the basis-expanded input ``z̃ = [x, 1] ⊗ φ(t)`` (``K = deg·n_eig`` basis values), so the layer
is ``h = C z̃`` with ``C`` of shape ``(d_out, (d_in + 1)·K)`` and has Kronecker factors like a
dense layer. Both layers read ``t`` from the last input column/channel (``DepthCat``).
The scalar ``dilation``/``shift`` parameters are not covered and get the plain gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.nn import GalConv2d, GalLinear

from torchdyn_snopt.curvature.base import LayerAdapter, append_ones, grad_of
from torchdyn_snopt.curvature.conv import channel_rows


def basis_values(layer: GalLinear | GalConv2d, t: Tensor) -> Tensor:
    """``φ(t)`` flattened as ``k = i·n_eig + e`` (the order of ``coeffs[p, i, e]``)."""
    device = layer.coeffs.device
    n_range = torch.linspace(0, layer.deg, layer.deg).to(device)
    s = t * layer.dilation.to(device) + layer.shift.to(device)
    basis = layer.expfunc(n_range, s)
    cols = [
        torch.as_tensor(b, device=device).to(layer.coeffs.dtype).expand(layer.deg) for b in basis
    ]
    return torch.stack(cols, dim=1).reshape(-1)


def _kron_rows(rows: Tensor, phi: Tensor) -> Tensor:
    """Row-wise ``r ⊗ φ``: ``(n, d)`` and ``(K,)`` → ``(n, d·K)``."""
    return (rows[:, :, None] * phi[None, None, :]).reshape(rows.shape[0], -1)


class _GalerkinAdapter(LayerAdapter):
    """Shared matrix view of ``coeffs``: first ``d_out·d_in`` rows weights, last ``d_out`` bias."""

    module: GalLinear | GalConv2d

    def __init__(self, module: GalLinear | GalConv2d, name: str) -> None:
        super().__init__(module, name)
        self.n_basis = module.deg * module.n_eig

    @property
    def _shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def params(self) -> list[nn.Parameter]:
        return [self.module.coeffs]

    def _coeff_view(self, c: Tensor) -> Tensor:
        d_out, d_in = self._shape
        c = c[:, :, : self.module.n_eig].reshape(c.shape[0], self.n_basis)
        w = c[: d_out * d_in].reshape(d_out, d_in * self.n_basis)
        b = c[d_out * d_in : d_out * (d_in + 1)]
        return torch.cat([w, b], dim=1)

    def grad_matrix(self) -> Tensor:
        return self._coeff_view(grad_of(self.module.coeffs))

    def param_matrix(self) -> Tensor:
        return self._coeff_view(self.module.coeffs.detach())

    def set_grad_matrix(self, matrix: Tensor) -> None:
        d_out, d_in = self._shape
        grad = grad_of(self.module.coeffs)
        k, n_eig = self.n_basis, self.module.n_eig
        w = matrix[:, : d_in * k].reshape(d_out * d_in, self.module.deg, n_eig)
        b = matrix[:, d_in * k :].reshape(d_out, self.module.deg, n_eig)
        grad[: d_out * d_in, :, :n_eig] = w
        grad[d_out * d_in : d_out * (d_in + 1), :, :n_eig] = b


class GalLinearAdapter(_GalerkinAdapter):
    """``GalLinear``: input ``(N, d_in + 1)`` whose last column is ``t``."""

    module: GalLinear

    @property
    def _shape(self) -> tuple[int, int]:
        return self.module.out_features, self.module.in_features

    def input_rows(self, inputs: tuple[Any, ...]) -> Tensor:
        inp = inputs[0]
        phi = basis_values(self.module, inp[-1, -1])
        return _kron_rows(append_ones(inp[:, :-1]), phi)

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return grad_output.reshape(-1, self.module.out_features)


class GalConv2dAdapter(_GalerkinAdapter):
    """``GalConv2d``: input ``(N, C_in + 1, H, W)`` whose last channel is ``t``."""

    thin_bases = False  # see LayerAdapter.thin_bases

    module: GalConv2d

    @property
    def _shape(self) -> tuple[int, int]:
        m = self.module
        return m.oc, m.ic * m.ks * m.ks

    def input_rows(self, inputs: tuple[Any, ...]) -> Tensor:
        m, inp = self.module, inputs[0]
        phi = basis_values(m, inp[-1, -1, 0, 0])
        cols = torch.nn.functional.unfold(inp[:, :-1], m.ks, padding=m.pad, stride=m.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return _kron_rows(append_ones(rows), phi)

    def output_rows(self, grad_output: Tensor) -> Tensor:
        return channel_rows(grad_output)

    def locations(self, output: Tensor) -> int:
        return output.shape[-1] * output.shape[-2]
