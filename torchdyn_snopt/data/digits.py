"""scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes; ships inside scikit-learn)."""

from __future__ import annotations

import torch
from torch import Tensor

from torchdyn_snopt._extras import require
from torchdyn_snopt.data._split import stratified_split


def load_digits(
    test_fraction: float = 0.25, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stratified, deterministic train/test split of sklearn's digits.

    Returns ``(x_train, y_train, x_test, y_test)`` with images ``(N, 1, 8, 8)`` scaled to
    ``[0, 1]`` then standardised with the training mean and std, labels ``(N,)`` int64.
    Raises ``ImportError`` naming the install command when scikit-learn is missing.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid; accepted: (0, 1)")
    bunch = require("sklearn.datasets", "the digits dataset").load_digits()
    x = torch.tensor(bunch.images, dtype=dtype)[:, None] / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    return stratified_split(x, y, test_fraction, seed)
