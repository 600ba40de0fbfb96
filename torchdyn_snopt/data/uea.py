"""UEA multivariate time-series archive, read offline from ``.ts`` files.

BasicMotions (6 channels, 4 classes, length 100) and JapaneseVowels (12 channels, 9 classes,
lengths 7-29) ship inside sktime's ``datasets/data`` folder and are read with sktime's
``.ts`` reader (pure pandas, no numba); any other UEA dataset loads from local ``.ts`` paths.

Layout of the returned series (torchcde's convention, time as a channel)::

    x[n, k] = [t_k, v_1, ..., v_C]     shape (N, L, 1 + C)

with ``t_k = k / (L - 1)`` (``L`` = the longest series of train and test together, so every
time lies in ``[0, 1]``). Series shorter than ``L`` are padded with NaN in every channel,
time included: nothing is truncated, and a model reads a series' length as the number of
finite times. Missing values inside a series stay NaN. Values are normalised per channel
with the mean and std of the training split's observed values.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from torchdyn_snopt._extras import require

#: UEA datasets that ship inside sktime and load by name.
UEA_DATASETS: tuple[str, ...] = ("BasicMotions", "JapaneseVowels")


def _read_ts(path: str | Path) -> tuple[list[Tensor], list[str]]:
    """Series (each ``(L_i, C)`` float64, NaN for missing) and string labels of one file."""
    sktime_datasets = require("sktime.datasets", "reading UEA .ts files")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path={str(path)!r} is not a file; expected a UEA .ts file")
    frame, labels = sktime_datasets.load_from_tsfile_to_dataframe(str(path))
    series = []
    for i in range(len(frame)):
        cols = [torch.tensor(frame.iloc[i, c].to_numpy(dtype=float)) for c in range(frame.shape[1])]
        length = max(len(c) for c in cols)
        out = torch.full((length, len(cols)), float("nan"), dtype=torch.float64)
        for c, col in enumerate(cols):
            out[: len(col), c] = col
        series.append(out)
    return series, [str(label) for label in labels]


def _pad(series: list[Tensor], length: int, dtype: torch.dtype) -> Tensor:
    """``(N, length, 1 + C)``: time channel then values, NaN after each series' end."""
    channels = series[0].shape[1]
    x = torch.full((len(series), length, 1 + channels), float("nan"), dtype=torch.float64)
    times = torch.arange(length, dtype=torch.float64) / max(length - 1, 1)
    for n, s in enumerate(series):
        x[n, : len(s), 0] = times[: len(s)]
        x[n, : len(s), 1:] = s
    return x.to(dtype)


def load_uea_ts(
    train_path: str | Path,
    test_path: str | Path,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load a UEA dataset from its local ``*_TRAIN.ts`` and ``*_TEST.ts`` files.

    Returns ``(x_train, y_train, x_test, y_test)``: series ``(N, L, 1 + C)`` as described in
    this module's docstring, labels ``(N,)`` int64 numbering the sorted training labels.
    Raises ``ValueError`` when the test split has a label the training split lacks or the
    two splits differ in their number of channels.
    """
    train, train_labels = _read_ts(train_path)
    test, test_labels = _read_ts(test_path)
    if train[0].shape[1] != test[0].shape[1]:
        raise ValueError(
            f"test_path={str(test_path)!r} has {test[0].shape[1]} channels, "
            f"train_path={str(train_path)!r} {train[0].shape[1]}; they must match"
        )
    classes = sorted(set(train_labels))
    unknown = sorted(set(test_labels) - set(classes))
    if unknown:
        raise ValueError(
            f"test_path={str(test_path)!r} has labels {unknown} absent from the training split"
        )
    index = {c: i for i, c in enumerate(classes)}
    length = max(len(s) for s in train + test)
    x_train, x_test = _pad(train, length, torch.float64), _pad(test, length, torch.float64)
    values = x_train[..., 1:].reshape(-1, x_train.shape[-1] - 1)
    observed = ~torch.isnan(values)
    count = observed.sum(0).clamp(min=1)
    mean = torch.where(observed, values, 0.0).sum(0) / count
    var = torch.where(observed, (values - mean) ** 2, 0.0).sum(0) / (count - 1).clamp(min=1)
    std = var.sqrt().clamp(min=1e-12)
    for x in (x_train, x_test):
        x[..., 1:] = (x[..., 1:] - mean) / std  # per channel, training statistics
    y_train = torch.tensor([index[c] for c in train_labels], dtype=torch.long)
    y_test = torch.tensor([index[c] for c in test_labels], dtype=torch.long)
    return x_train.to(dtype), y_train, x_test.to(dtype), y_test


def sktime_ts_path(name: str, split: str) -> Path:
    """Path of ``<name>_<split>.ts`` inside sktime's bundled ``datasets/data`` folder."""
    sktime = require("sktime", "the bundled UEA datasets")

    root = Path(sktime.__path__[0]) / "datasets" / "data"
    return root / name / f"{name}_{split}.ts"


def load_uea(
    name: str, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One of :data:`UEA_DATASETS` with its official train/test split (see :func:`load_uea_ts`)."""
    if name not in UEA_DATASETS:
        raise ValueError(
            f"name={name!r} is not a bundled UEA dataset; accepted: {', '.join(UEA_DATASETS)} "
            "(others: load_uea_ts(train_path, test_path))"
        )
    return load_uea_ts(sktime_ts_path(name, "TRAIN"), sktime_ts_path(name, "TEST"), dtype)


def series_lengths(x: Tensor) -> Tensor:
    """Observed length of each series of ``x`` ``(N, L, 1 + C)``: its number of finite times."""
    return torch.isfinite(x[..., 0]).sum(1)
