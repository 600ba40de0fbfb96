"""The paper's time-series model (§4): ODE-RNN, the hybrid of Rubanova et al. 2019.

A Neural ODE carries the hidden state between observation times, a GRU cell folds in each
observation, a linear layer reads the class from the state at the series' last observation.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE

from torchdyn_snopt.adjoint import set_horizon
from torchdyn_snopt.nn import GRUCell
from torchdyn_snopt.registration import is_snopt_problem


class HiddenField(nn.Module):
    """``F(t, h) = W₂ tanh(W₁ h + b₁) + b₂`` on the hidden state (time-invariant)."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.Tanh(), nn.Linear(width, hidden))

    def forward(self, t: Tensor, h: Tensor, args: dict | None = None) -> Tensor:
        return self.net(h)


class ODERNN(nn.Module):
    """ODE-RNN classifier for series ``x`` of shape ``(N, L, 1 + C)`` (time, then C values).

    Irregular times: each series has its own times in channel 0; the batch is stepped through
    the sorted union of its finite times, one ODE solve from each union time to the next, and
    a series is updated by the GRU only at its own observation times. Missing values: NaN per
    channel; the GRU reads ``[value or 0, observed mask]`` (``2C`` inputs) and skips a series
    when all its channels are missing. Variable lengths: a series ends at its last finite time
    (NaN padding after it); the head reads the state after the series' last observation.

    Args:
        in_channels: value channels ``C`` (time excluded).
        num_classes: output logits.
        hidden: hidden-state size (default 32).
        width: the ODE field's inner width (64).
        sensitivity: of the hidden-state ``NeuralODE`` (default "snopt").
        solver: of that ``NeuralODE`` (default rk4, one step per observation gap).
        tol: atol = rtol of adaptive solvers.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: int = 32,
        width: int = 64,
        sensitivity: str = "snopt",
        solver: str | nn.Module = "rk4",
        tol: float = 1e-3,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= 1")
        self.in_channels, self.hidden = in_channels, hidden
        self.ode = NeuralODE(
            HiddenField(hidden, width),
            sensitivity=sensitivity,
            solver=solver,
            atol=tol,
            rtol=tol,
            atol_adjoint=tol,
            rtol_adjoint=tol,
            return_t_eval=False,
        )
        self.cell = GRUCell(2 * in_channels, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != 1 + self.in_channels:
            raise ValueError(
                f"x has shape {tuple(x.shape)}; accepted: (N, L, 1 + in_channels) = "
                f"(N, L, {1 + self.in_channels})"
            )
        t, values = x[..., 0], x[..., 1:]
        times = torch.unique(t[torch.isfinite(t)])  # sorted union of observation times
        if len(times) == 0:
            raise ValueError("x has no finite time in channel 0: every series is empty")
        if is_snopt_problem(self.ode):  # one Gauss-Newton horizon for all the short solves
            set_horizon(self.ode, float(times[-1] - times[0]) or None)
        h = x.new_zeros(x.shape[0], self.hidden)
        last = h
        for k in range(len(times)):
            if k:
                h = self.ode(h, times[k - 1 : k + 1])[-1]
            hit = t == times[k]  # (N, L): which entry of each series sits at this time
            seen = hit.any(1)
            v = torch.where(hit[..., None], values, 0.0).sum(1)
            mask = hit[..., None] & ~torch.isnan(values)
            observed = mask.any(1)
            update = observed.any(1, keepdim=True)
            inp = torch.cat([torch.where(observed, v, 0.0), observed.to(x.dtype)], dim=1)
            h = torch.where(update, self.cell(inp, h), h)
            last = torch.where(seen[:, None], h, last)
        return self.head(last)
