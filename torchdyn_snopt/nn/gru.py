"""A drop-in ``torch.nn.GRUCell`` whose gate pre-activations pass through two small modules.

``torch.nn.GRUCell`` computes its gates inside one fused kernel, so no hook can see the
pre-activations ``W_ih x + b_ih`` and ``W_hh h + b_hh``. Here each of the two affine maps is a
parameter-free :class:`GatePreactivation` child (``input_gates``, ``hidden_gates``) reading the
cell's own ``weight_ih``/``bias_ih`` and ``weight_hh``/``bias_hh``; the K-FAC adapter of
:mod:`torchdyn_snopt.curvature.gru` hooks those children. Parameters, their names, shapes,
initialisation and the state_dict are those of ``torch.nn.GRUCell``::

    r = σ(W_ir x + b_ir + W_hr h + b_hr)
    z = σ(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    h' = (1 - z) ⊙ n + z ⊙ h
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class GatePreactivation(nn.Module):
    """``h = W z + b`` for one of a :class:`GRUCell`'s two weight matrices (no own parameters).

    ``which`` is ``"ih"`` (input → gates) or ``"hh"`` (hidden → gates). The owning cell is kept
    in the instance ``__dict__``, outside ``_modules``: ``modules()``, ``state_dict()`` and
    ``.to()`` never walk back up, while ``copy.deepcopy`` and pickling keep the pair together.
    """

    def __init__(self, cell: GRUCell, which: str) -> None:
        super().__init__()
        if which not in ("ih", "hh"):
            raise ValueError(f"which={which!r} is invalid; accepted: 'ih', 'hh'")
        self.which = which
        self.__dict__["_cell"] = cell

    @property
    def cell(self) -> GRUCell:
        return self.__dict__["_cell"]

    @property
    def weight(self) -> nn.Parameter:
        return getattr(self.cell, f"weight_{self.which}")

    @property
    def bias(self) -> nn.Parameter | None:
        return getattr(self.cell, f"bias_{self.which}")

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, z: Tensor) -> Tensor:
        return F.linear(z, self.weight, self.bias)


class GRUCell(nn.Module):
    """Same constructor, parameters and outputs as ``torch.nn.GRUCell``.

    Args:
        input_size: features of the input ``x``.
        hidden_size: features of the hidden state ``h``.
        bias: learn ``bias_ih`` and ``bias_hh`` (default True).

    Shapes: ``x`` ``(N, input_size)`` or ``(input_size,)``, ``hx`` ``(N, hidden_size)`` or
    ``(hidden_size,)`` (zeros when omitted); returns ``h'`` with the shape of ``hx``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= 1")
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size, **kw))
            self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.input_gates = GatePreactivation(self, "ih")
        self.hidden_gates = GatePreactivation(self, "hh")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))`` for every parameter, as torch does."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")

    def forward(self, x: Tensor, hx: Tensor | None = None) -> Tensor:
        if x.dim() not in (1, 2):
            raise ValueError(f"x has shape {tuple(x.shape)}; accepted: 1-D or 2-D")
        unbatched = x.dim() == 1
        if unbatched:
            x = x.unsqueeze(0)
        if hx is None:
            hx = x.new_zeros(x.shape[0], self.hidden_size)
        elif unbatched:
            hx = hx.unsqueeze(0)
        gi = self.input_gates(x)
        gh = self.hidden_gates(hx)
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        h = (1.0 - z) * n + z * hx
        return h.squeeze(0) if unbatched else h
