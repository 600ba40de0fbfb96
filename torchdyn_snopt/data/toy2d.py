"""2-D toy densities generated in code (no files): circles, two moons, 8 Gaussians.

Circles is the concentric-circles set of Chen et al. (2018)'s CNF demo (sklearn
``make_circles``, noise 0.06, inner radius 0.5), the paper's "Circle" (Fig. 8), which is
integrated on ``t ∈ [0, 10]``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchdyn_snopt._extras import require


def _check(n_train: int, n_test: int) -> None:
    for arg, value in (("n_train", n_train), ("n_test", n_test)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{arg}={value!r} is invalid; accepted: an int >= 1")


def _circles(n: int, seed: int) -> Tensor:
    make_circles = require("sklearn.datasets", "the circles dataset").make_circles
    x, _ = make_circles(n_samples=n, noise=0.06, factor=0.5, random_state=seed)
    return torch.as_tensor(x)


def _moons(n: int, seed: int) -> Tensor:
    make_moons = require("sklearn.datasets", "the moons dataset").make_moons
    x, _ = make_moons(n_samples=n, noise=0.05, random_state=seed)
    x = torch.as_tensor(x)
    return (x - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])  # about unit scale


def _eight_gaussians(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    centers = 2.0 * torch.stack([angles.cos(), angles.sin()], 1)  # radius 2
    which = torch.randint(0, 8, (n,), generator=g)
    return centers[which] + 0.2 * torch.randn(n, 2, generator=g, dtype=torch.float64)


_TOYS = {"circles": _circles, "moons": _moons, "8gaussians": _eight_gaussians}
TOY_DATASETS: tuple[str, ...] = tuple(_TOYS)


def load_toy(
    name: str,
    n_train: int = 4096,
    n_test: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """``(x_train (n_train, 2), x_test (n_test, 2))`` of toy ``name`` (independent draws).

    ``name``: one of :data:`TOY_DATASETS`. Deterministic in ``seed``.
    """
    if name not in _TOYS:
        raise ValueError(f"name={name!r} is not a toy dataset; accepted: {', '.join(TOY_DATASETS)}")
    _check(n_train, n_test)
    x = _TOYS[name](n_train + n_test, seed).to(dtype)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = x[perm]
    return x[:n_train], x[n_train:]
