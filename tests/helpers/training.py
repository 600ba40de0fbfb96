"""A fixed training loop of the tests (minibatches in order, so a resumed run sees the same
stream)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


def train_steps(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, x: Tensor, y: Tensor, start: int = 0
) -> None:
    """``steps`` cross-entropy iterations on minibatches of 16 taken in order (wrapping) from
    ``(x, y)``, starting at minibatch ``start`` (so a resumed run sees the same stream)."""
    for i in range(start, start + steps):
        idx = torch.arange(i * 16, i * 16 + 16) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
