"""Fashion-MNIST (Zalando; 60,000 train / 10,000 test, 28×28 grey, 10 classes), read offline.

The Debian package ``dataset-fashion-mnist`` installs the four official IDX files, gzip'ed,
under ``/usr/share/datasets/fashion-mnist``::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

Any other directory with the same files, gzip'ed or not, can be passed as ``root``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/ file format)
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip'ed or not, told apart by content, not by name).

    Header: two zero bytes, a type byte (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), a byte ``ndim``, then ``ndim``
    big-endian uint32 sizes; the big-endian data follows. Returns an array of that shape in
    native byte order. Raises ``ValueError`` on a bad magic number or a size mismatch.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        accepted = ", ".join(f"0x0000{code:02X}nn" for code in _IDX_DTYPES)
        raise ValueError(
            f"{path}: magic number 0x{raw[:4].hex().upper()} is not an IDX header; "
            f"accepted: {accepted} (nn = number of dimensions)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, ndim={ndim})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX data has {len(raw) - header} bytes; the header's shape {shape} "
            f"of {dtype.name} needs {expected}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # a writable, native-order copy


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}; install the Debian package "
        f"({INSTALL_HINT}, files in {DEFAULT_ROOT}) or pass root= a directory holding the "
        "four IDX files"
    )


def _first_per_class(y: np.ndarray, k: int, name: str) -> np.ndarray:
    """Indices (in file order) of the first ``k // 10`` images of each class, classes
    ``0 .. k % 10 - 1`` taking one more."""
    if k < 1:
        raise ValueError(f"{name}={k!r} is invalid; accepted: None or a positive int")
    keep = [np.flatnonzero(y == c)[: k // 10 + (c < k % 10)] for c in range(10)]
    return np.sort(np.concatenate(keep))


def load_fashion_mnist(
    root: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    max_train: int | None = None,
    max_test: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fashion-MNIST with its official split, read from IDX files.

    Returns ``(x_train, y_train, x_test, y_test)`` with images ``(N, 1, 28, 28)`` scaled to
    ``[0, 1]`` then standardised with the training mean and std (scalars; computed over the
    training images returned), labels ``(N,)`` int64 in ``0..9`` (names in ``CLASSES``).
    Full data: 60,000 train / 10,000 test images. ``root=None`` reads the Debian package's
    ``/usr/share/datasets/fashion-mnist``. ``max_train`` / ``max_test`` (for quick runs)
    keep a class-balanced, deterministic subset: the first ``k // 10`` images of each class
    in file order (the first ``k % 10`` classes take one more), so at most ``k`` images,
    kept in file order; ``None`` keeps the whole split. Raises ``FileNotFoundError`` naming
    the install command when a file is missing.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is invalid; accepted: a floating-point dtype")
    root = DEFAULT_ROOT if root is None else Path(root)
    splits = []
    for prefix, k, name in (("train", max_train, "max_train"), ("t10k", max_test, "max_test")):
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{root}: {prefix} images {images.shape} / labels {labels.shape}; "
                "expected (N, 28, 28) / (N,)"
            )
        if k is not None:
            keep = _first_per_class(labels, k, name)
            images, labels = images[keep], labels[keep]
        splits.append((images, labels))
    (train_u8, y_train), (test_u8, y_test) = splits
    # exact mean / (unbiased) std of train pixels / 255, from the 256-bin histogram
    counts = np.bincount(train_u8.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum()
    mean = float(counts @ values / n)
    std = float(np.sqrt(counts @ (values - mean) ** 2 / (n - 1)))

    def standardise(u8: np.ndarray) -> Tensor:
        x = torch.from_numpy(u8).reshape(-1, 1, 28, 28).to(dtype)
        return x.div_(255.0).sub_(mean).div_(std)

    return (
        standardise(train_u8),
        torch.from_numpy(y_train.astype(np.int64)),
        standardise(test_u8),
        torch.from_numpy(y_test.astype(np.int64)),
    )
