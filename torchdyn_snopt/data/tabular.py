"""Real tabular density sets available offline, standardised per feature on the train split.

- ``breast_cancer`` (569 × 30) and ``wine`` (178 × 13): ship inside scikit-learn.
- ``shuttle`` (49,097 × 9, integer sensor readings): ships inside river
  (``river.datasets.Shuttle``); dequantized with ``U(0, 1)`` noise before standardising.
- The paper's Gas and Miniboone (FFJORD's preprocessed UCI files) cannot be bundled;
  :func:`load_array_file` reads a copy the user has (``.npy``, ``.csv`` or whitespace text).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from torchdyn_snopt._extras import require


def split_standardise(
    x: Tensor, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Random ``(train, test)`` split of the rows; both scaled by the train mean and std."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid; accepted: (0, 1)")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(x) * test_fraction)
    train, test = x[perm[n_test:]], x[perm[:n_test]]
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std


def _sklearn(name: str) -> np.ndarray:
    datasets = require("sklearn.datasets", f"the {name} dataset")
    return getattr(datasets, f"load_{name}")().data


def _shuttle(seed: int) -> np.ndarray:
    shuttle = require("river.datasets", "the shuttle dataset (it ships with river)").Shuttle()
    raw = np.loadtxt(shuttle.path, delimiter=",", skiprows=1)[:, :9]  # drop the label
    rng = np.random.default_rng(seed)
    return raw + rng.uniform(size=raw.shape)  # dequantize the integer readings


TABULAR_DATASETS: tuple[str, ...] = ("breast_cancer", "wine", "shuttle")


def load_tabular(
    name: str, test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``(x_train, x_test)`` of ``name`` (one of :data:`TABULAR_DATASETS`), standardised."""
    if name == "shuttle":
        raw = _shuttle(seed)
    elif name in TABULAR_DATASETS:
        raw = _sklearn(name)
    else:
        raise ValueError(
            f"name={name!r} is not a tabular dataset; accepted: {', '.join(TABULAR_DATASETS)}"
        )
    return split_standardise(torch.as_tensor(raw, dtype=dtype), test_fraction, seed)


def load_array_file(
    path: str | Path, test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """``(x_train, x_test)`` from a numeric ``(N, d)`` array file: ``.npy``, ``.csv`` (one
    header line allowed) or whitespace-separated text, e.g. an exported Gas or Miniboone."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"path={str(path)!r} is not a file")
    if path.suffix == ".npy":
        raw = np.load(path)
    else:
        delim = "," if path.suffix == ".csv" else None
        try:
            raw = np.loadtxt(path, delimiter=delim)
        except ValueError:
            raw = np.loadtxt(path, delimiter=delim, skiprows=1)
    if raw.ndim != 2:
        raise ValueError(f"path={str(path)!r} holds an array of shape {raw.shape}; accepted: 2-D")
    return split_standardise(torch.as_tensor(raw, dtype=dtype), test_fraction, seed)
