"""The paper's image model: conv feature extractor → conv Neural ODE → linear head (§4)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torchdyn.core import NeuralODE


class ConvField(nn.Module):
    """``F(t, x) = conv(tanh(conv(x)))`` on ``channels`` feature maps (time-invariant)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, t: Tensor, x: Tensor, args: dict | None = None) -> Tensor:
        return self.net(x)


class ImageClassifier(nn.Module):
    """Classifier for ``(N, C_in, H, W)`` images: ``channels`` maps, ODE over ``[0, t1]``.

    ``sensitivity``, ``solver`` and tolerances go to the ``NeuralODE`` (defaults: "snopt",
    dopri5, 1e-3 and the backward semi-norm, as in the paper's image experiments; torchdyn's
    own "adjoint" always uses that semi-norm). ``downsample`` stride-2 convolutions shrink the
    feature maps before the ODE (2 for 28×28 images).
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        num_classes: int = 10,
        channels: int = 12,
        sensitivity: str = "snopt",
        solver: str = "dopri5",
        tol: float = 1e-3,
        t1: float = 1.0,
        downsample: int = 0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU()]
        for _ in range(downsample):  # each halves the feature maps (28 → 14 → 7)
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.ReLU()]
            image_size //= 2
        self.features = nn.Sequential(*layers)
        self.ode = NeuralODE(
            ConvField(channels),
            sensitivity=sensitivity,
            solver=solver,
            atol=tol,
            rtol=tol,
            atol_adjoint=tol,
            rtol_adjoint=tol,
            seminorm=True,
            return_t_eval=False,
        )
        self.register_buffer("t_span", torch.tensor([0.0, t1]))
        self.head = nn.Linear(channels * image_size * image_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        z = self.ode(self.features(x), self.t_span)[-1]
        return self.head(z.flatten(1))
