"""UEA loaders: official splits, classes, lengths kept, per-channel normalisation, no NaN added."""

import pytest
import torch

from torchdyn_snopt.data import load_uea, load_uea_ts, series_lengths
from torchdyn_snopt.data.uea import _read_ts, sktime_ts_path

# name: (channels, classes, train size, test size, min length, max length)
EXPECTED = {
    "BasicMotions": (6, 4, 40, 40, 100, 100),
    "JapaneseVowels": (12, 9, 270, 370, 7, 29),
}


@pytest.fixture(scope="module", params=list(EXPECTED))
def dataset(request):
    name = request.param
    return name, load_uea(name, dtype=torch.float64)


def test_shapes_classes_and_split(dataset):
    name, (x_train, y_train, x_test, y_test) = dataset
    channels, classes, n_train, n_test, _, longest = EXPECTED[name]
    assert x_train.shape == (n_train, longest, 1 + channels)
    assert x_test.shape == (n_test, longest, 1 + channels)
    assert y_train.dtype == torch.int64 and y_train.shape == (n_train,)
    assert set(y_train.tolist()) == set(range(classes)) == set(y_test.tolist())


def test_lengths_kept_and_no_nan_introduced(dataset):
    name, (x_train, _, x_test, _) = dataset
    _, _, _, _, shortest, longest = EXPECTED[name]
    for split, x in (("TRAIN", x_train), ("TEST", x_test)):
        raw, _ = _read_ts(sktime_ts_path(name, split))
        lengths = series_lengths(x)
        assert lengths.tolist() == [len(s) for s in raw]  # nothing truncated or padded in
        assert int(lengths.min()) >= shortest and int(lengths.max()) <= longest
        inside = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        raw_nan = sum(int(torch.isnan(s).sum()) for s in raw)
        assert int(torch.isnan(x[..., 1:][inside]).sum()) == raw_nan  # the file's own NaN only
        assert torch.isnan(x[~inside]).all()  # padding, time channel included
        t = x[..., 0]
        assert (t[inside] >= 0).all() and (t[inside] <= 1).all()
    lengths = torch.cat([series_lengths(x_train), series_lengths(x_test)])
    assert int(lengths.min()) == shortest and int(lengths.max()) == longest


def test_per_channel_normalisation_on_training_split(dataset):
    _, (x_train, _, _, _) = dataset
    v = x_train[..., 1:].reshape(-1, x_train.shape[-1] - 1)
    for c in range(v.shape[1]):
        col = v[:, c][~torch.isnan(v[:, c])]
        assert abs(float(col.mean())) < 1e-9 and abs(float(col.std()) - 1.0) < 1e-9


TS = """@problemName Toy
@timeStamps false
@missing true
@univariate false
@dimensions 2
@equalLength false
@classLabel true a b
@data
1.0,2.0,3.0:4.0,?,6.0:a
0.5,1.5:2.5,3.5:b
"""


def test_any_ts_file_by_path(tmp_path):
    (tmp_path / "Toy_TRAIN.ts").write_text(TS)
    (tmp_path / "Toy_TEST.ts").write_text(TS.replace(":a\n", ":b\n"))
    x_train, y_train, x_test, y_test = load_uea_ts(
        tmp_path / "Toy_TRAIN.ts", tmp_path / "Toy_TEST.ts"
    )
    assert x_train.shape == (2, 3, 3) and y_train.tolist() == [0, 1] and y_test.tolist() == [1, 1]
    assert series_lengths(x_train).tolist() == [3, 2]
    assert torch.isnan(x_train[0, 1, 2]) and torch.isfinite(x_train[0, 2, 2])  # "?" is missing
    assert torch.equal(x_train[0, :, 0], torch.tensor([0.0, 0.5, 1.0]))


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="name='Nope'"):
        load_uea("Nope")
    with pytest.raises(FileNotFoundError, match="missing.ts"):
        load_uea_ts(tmp_path / "missing.ts", tmp_path / "missing.ts")
    (tmp_path / "a.ts").write_text(TS)
    (tmp_path / "b.ts").write_text(TS.replace("a b", "a b c").replace(":b\n", ":c\n"))
    with pytest.raises(ValueError, match="labels \\['c'\\]"):
        load_uea_ts(tmp_path / "a.ts", tmp_path / "b.ts")
