"""Inputs of the tests: states, time grids, labelled sets and irregular series, each drawn
from an explicit seed (a generator of its own; the global RNG is left alone)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from tests.helpers.numerics import DTYPE, SEED, is_fixed


def mlp_data(batch: int = 8, dim: int = 3, seed: int = SEED + 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, dtype=DTYPE, generator=g)


def conv_data(batch: int = 2, channels: int = 3, size: int = 6, seed: int = SEED + 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, dtype=DTYPE, generator=g)


def default_t_span(solver: str | nn.Module) -> Tensor:
    """Few points for adaptive solvers; many for fixed-step ones (one step per interval)."""
    n = 41 if is_fixed(solver) else 5
    return torch.linspace(0.0, 1.0, n, dtype=DTYPE)


def classification_data(n: int = 64, seed: int = 0, dtype=DTYPE) -> tuple[Tensor, Tensor]:
    """6-d Gaussian inputs with 3 classes from two half-space rules."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return x, y


def irregular_series(batch: int = 4, length: int = 7, channels: int = 2, seed: int = 3) -> Tensor:
    """``(batch, length, 1 + channels)`` float64 series, time first (torchcde's layout).

    Every series has its own increasing, irregular times in ``[0, 1]``; a few values are
    missing (NaN in one channel); series 1 is two observations shorter (NaN padding, time
    included) and series 2 shares times with series 0 except one.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(batch, length, generator=g, dtype=DTYPE), dim=1)[0]
    t[:, 0] = 0.0
    t[2] = t[0]
    t[2, 3] = (t[0, 3] + t[0, 4]) / 2
    x = torch.randn(batch, length, channels, generator=g, dtype=DTYPE)
    x[0, 2, 0] = x[3, 4, 1] = x[2, 5, channels - 1] = float("nan")
    out = torch.cat([t[..., None], x], dim=-1)
    out[1, length - 2 :] = float("nan")
    return out


def cde_path_series(batch: int = 4, length: int = 8, channels: int = 2, seed: int = 5):
    """Series sharing one irregular time grid (returned too), with missing values: what
    ``torchcde`` coefficients with an explicit ``t`` need."""
    g = torch.Generator().manual_seed(seed)
    t = torch.sort(torch.rand(length, generator=g, dtype=DTYPE))[0] * 2.0
    x = torch.randn(batch, length, channels, generator=g, dtype=DTYPE)
    x[0, 3, 1] = x[2, 5, 0] = x[1, length - 2, 1] = float("nan")
    return torch.cat([t.expand(batch, length)[..., None], x], dim=-1), t
