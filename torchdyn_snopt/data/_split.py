"""Stratified deterministic train/test split with training-set standardisation."""

from __future__ import annotations

import torch
from torch import Tensor


def stratified_split(
    x: Tensor,
    y: Tensor,
    test_fraction: float,
    seed: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each class sends ``round(n_c · test_fraction)`` random images (``seed``) to the test
    split; both splits are standardised with the training mean and std (scalars)."""
    g = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in y.unique().tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test_idx.append(idx[: round(len(idx) * test_fraction)])
    test = torch.zeros(len(y), dtype=torch.bool)
    test[torch.cat(test_idx)] = True
    x_train, x_test = x[~test], x[test]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[~test], (x_test - mean) / std, y[test]
