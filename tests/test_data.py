"""Datasets: embedded digits, generated sets, CIFAR from local pickles, augmentation."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch

from ics_toolkit import ICSValueError
from ics_toolkit.data import (
    DATASETS,
    SHAPE_NAMES,
    Dataset,
    DatasetNotFoundError,
    MissingExtraError,
    flip_and_shift,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    make_blobs,
    make_shapes,
)


# ----------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------
def test_digits_shapes_split_and_standardization():
    from sklearn.datasets import load_digits as sk_load

    ref = sk_load()
    data = load_digits()
    assert data.x_train.shape == (1347, 1, 8, 8) and data.x_test.shape == (450, 1, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert data.num_classes == 10 and data.class_names == tuple("0123456789")
    x = data.x_train.double()
    assert abs(float(x.mean())) < 1e-6 and abs(float(x.std(unbiased=False)) - 1) < 1e-6
    # stratified: each class keeps round(0.25 * count) test images
    counts = np.bincount(ref.target, minlength=10)
    np.testing.assert_array_equal(
        np.bincount(data.y_test.numpy(), minlength=10), np.round(0.25 * counts)
    )
    # the two parts are a partition of sklearn's images, labels attached
    raw = load_digits(standardize_inputs=False)
    rows = np.concatenate([raw.x_train.numpy().reshape(-1, 64), raw.x_test.numpy().reshape(-1, 64)])
    labels = np.concatenate([raw.y_train.numpy(), raw.y_test.numpy()])
    ours = np.concatenate([labels[:, None], rows], axis=1)
    theirs = np.concatenate([ref.target[:, None], ref.data], axis=1)
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(theirs, axis=0))
    assert len(ours) == len(theirs)


def test_digits_split_is_seeded():
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    assert load_digits(test_fraction=0.5).x_test.shape[0] in range(895, 905)


def test_digits_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now fails
    with pytest.raises(MissingExtraError, match=r'pip install "ics-toolkit\[data\]"'):
        load_digits()
    with pytest.raises(ImportError):
        load_digits()


# ----------------------------------------------------------------------------------------
# generated data
# ----------------------------------------------------------------------------------------
def test_blobs_are_seeded_balanced_and_separable():
    a = make_blobs(400, 200, num_classes=4, dim=8, separation=6.0, seed=3)
    b = make_blobs(400, 200, num_classes=4, dim=8, separation=6.0, seed=3)
    c = make_blobs(400, 200, num_classes=4, dim=8, separation=6.0, seed=4)
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.x_train, c.x_train)
    assert np.bincount(a.y_train.numpy()).tolist() == [100] * 4
    x, y = a.x_train.double().numpy(), a.y_train.numpy()
    means = np.stack([x[y == k].mean(0) for k in range(4)])
    # class means sit at distance `separation` from the origin (up to sampling error)
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 6.0, rtol=0.1)
    # per-coordinate spread around the class mean is `noise` = 1
    np.testing.assert_allclose((x - means[y]).std(), 1.0, rtol=0.05)
    # nearest class mean classifies the test split almost perfectly
    xt, yt = a.x_test.double().numpy(), a.y_test.numpy()
    pred = np.argmin(((xt[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == yt).mean() > 0.95


def test_shapes_are_seeded_balanced_and_look_right():
    a = make_shapes(160, 40, size=16, noise=0.0, seed=0, standardize_inputs=False)
    b = make_shapes(160, 40, size=16, noise=0.0, seed=0, standardize_inputs=False)
    assert torch.equal(a.x_train, b.x_train)
    assert a.class_names == SHAPE_NAMES and a.num_classes == 8
    assert np.bincount(a.y_train.numpy()).tolist() == [20] * 8
    img = a.x_train[:, 0].numpy()
    y = a.y_train.numpy()
    rows, cols = (img > 0).sum(2), (img > 0).sum(1)  # ink per row / per column
    # a horizontal bar fills few rows and many columns; a vertical bar the opposite
    h, v = y == SHAPE_NAMES.index("hbar"), y == SHAPE_NAMES.index("vbar")
    assert np.all((rows[h] > 0).sum(1) < (cols[h] > 0).sum(1))
    assert np.all((cols[v] > 0).sum(1) < (rows[v] > 0).sum(1))

    # a disk has ink at its centre of mass, a ring does not
    def ink_at_centre(images):
        out = []
        for im in images:
            yy, xx = np.nonzero(im > 0)
            out.append(im[round(yy.mean()), round(xx.mean())] > 0)
        return np.array(out)

    assert ink_at_centre(img[y == SHAPE_NAMES.index("disk")]).all()
    assert not ink_at_centre(img[y == SHAPE_NAMES.index("ring")]).any()
    std = make_shapes(160, 40, seed=0)
    x = std.x_train.double()
    assert abs(float(x.mean())) < 1e-6 and abs(float(x.std(unbiased=False)) - 1) < 1e-6


@pytest.mark.parametrize(
    ("call", "msg"),
    [
        (lambda: make_blobs(0, 10), "`n_train` must be a positive int"),
        (lambda: make_blobs(10, 10, noise=0.0), "`noise` must be > 0"),
        (lambda: make_shapes(10, 10, size=4), "`size` must be at least 8 pixels"),
        (lambda: make_shapes(10, 10, noise=-1.0), "`noise` must be >= 0"),
        (lambda: load_digits(test_fraction=1.0), r"`test_fraction` must be in \(0, 1\)"),
    ],
)
def test_generator_errors(call, msg):
    with pytest.raises(ICSValueError, match=msg):
        call()


# ----------------------------------------------------------------------------------------
# CIFAR from small files in the standard python pickle format
# ----------------------------------------------------------------------------------------
def _image_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path, obj) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _write_cifar10(root, per_batch: int = 4):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows, labels = [], []
    for i in range(1, 6):
        x = _image_rows(per_batch, rng)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        _dump(folder / f"data_batch_{i}", {b"batch_label": b"b", b"data": x, b"labels": y})
        rows.append(x)
        labels += y
    xt = _image_rows(3, rng)
    _dump(folder / "test_batch", {b"data": xt, b"labels": [1, 2, 3]})
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _dump(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return np.concatenate(rows), np.array(labels), xt


def test_cifar10_from_local_pickles(tmp_path):
    rows, labels, test_rows = _write_cifar10(tmp_path)
    data = load_cifar10(tmp_path, standardize_inputs=False)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (3, 3, 32, 32)
    assert data.y_train.tolist() == labels.tolist() and data.y_test.tolist() == [1, 2, 3]
    assert data.class_names[0] == "airplane" and len(data.class_names) == 10
    # layout: row = 1024 red, then green, then blue values, each row-major 32x32
    i, c, h, w = 7, 2, 5, 30
    assert float(data.x_train[i, c, h, w]) == pytest.approx(rows[i, c * 1024 + h * 32 + w] / 255)
    # the inner folder works as root too; standardization is per channel, train stats
    std = load_cifar10(tmp_path / "cifar-10-batches-py")
    x = rows.reshape(-1, 3, 32, 32).astype(np.float64)
    mean, sd = x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))
    expected = (test_rows.reshape(-1, 3, 32, 32) - mean[None, :, None, None]) / sd[
        None, :, None, None
    ]
    np.testing.assert_allclose(std.x_test.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert load_dataset("cifar10", root=tmp_path).x_train.shape == (20, 3, 32, 32)


def test_cifar100_fine_and_coarse(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(
        folder / "train",
        {
            b"data": _image_rows(6, rng),
            b"fine_labels": [0, 99, 5, 6, 7, 8],
            b"coarse_labels": [0, 19, 1, 1, 2, 2],
        },
    )
    _dump(
        folder / "test",
        {b"data": _image_rows(2, rng), b"fine_labels": [3, 4], b"coarse_labels": [5, 6]},
    )
    fine_names = [f"f{i}".encode() for i in range(100)]
    coarse_names = [f"c{i}".encode() for i in range(20)]
    _dump(folder / "meta", {b"fine_label_names": fine_names, b"coarse_label_names": coarse_names})
    fine = load_cifar100(tmp_path)
    assert fine.num_classes == 100 and fine.y_train.tolist() == [0, 99, 5, 6, 7, 8]
    assert fine.class_names[99] == "f99"
    coarse = load_cifar100(tmp_path, labels="coarse")
    assert coarse.num_classes == 20 and coarse.y_test.tolist() == [5, 6]
    with pytest.raises(ICSValueError, match="`labels` must be 'fine' or 'coarse'"):
        load_cifar100(tmp_path, labels="medium")


def test_cifar_missing_files_say_where_to_put_them(tmp_path, monkeypatch):
    with pytest.raises(
        DatasetNotFoundError,
        match=r"missing data_batch_1, .*batches\.meta.*cifar-10-python\.tar\.gz.*https://www\.cs\.toronto\.edu/~kriz/cifar\.html",
    ):
        load_cifar10(tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar100(tmp_path)
    monkeypatch.setenv("ICS_TOOLKIT_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(
        DatasetNotFoundError,
        match=r"the default folder \(\$ICS_TOOLKIT_DATA or \./data\).*elsewhere",
    ):
        load_cifar10()


def test_cifar_refuses_pickles_with_code(tmp_path):
    _write_cifar10(tmp_path)
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": sys.exit}
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", evil)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load sys\.exit"):
        load_cifar10(tmp_path)


def test_cifar_bad_rows(tmp_path):
    _write_cifar10(tmp_path)
    _dump(
        tmp_path / "cifar-10-batches-py" / "test_batch",
        {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
    )
    with pytest.raises(ICSValueError, match=r"'data' must have shape \(n, 3072\)"):
        load_cifar10(tmp_path)


# ----------------------------------------------------------------------------------------
# the container and the registry
# ----------------------------------------------------------------------------------------
def test_load_dataset_registry_and_errors():
    assert set(DATASETS) == {"digits", "blobs", "shapes", "cifar10", "cifar100"}
    data = load_dataset("shapes", n_train=16, n_test=8, size=8)
    assert data.input_shape == (1, 8, 8) and data.in_features == 64
    with pytest.raises(ICSValueError, match="unknown dataset 'mnist'; known: digits, blobs"):
        load_dataset("mnist")
    with pytest.raises(
        ICSValueError, match=r"load_dataset\('blobs'\): .*unexpected keyword argument 'size'"
    ):
        load_dataset("blobs", size=3)


def test_dataset_container():
    data = make_blobs(20, 10, dim=3)
    small = data.subset(5, 2)
    assert (len(small.y_train), len(small.y_test)) == (5, 2)
    assert torch.equal(small.x_train, data.x_train[:5])
    assert data.to("cpu").x_train.device.type == "cpu"
    assert repr(small) == "Dataset('blobs', train=5, test=2, input_shape=(3,), num_classes=4)"
    with pytest.raises(ICSValueError, match=r"labels in \[0, 2\), got \[0, 5\]"):
        Dataset(
            "bad", torch.zeros(2, 1), torch.tensor([0, 5]), torch.zeros(1, 1), torch.tensor([0]), 2
        )
    with pytest.raises(ICSValueError, match="same n"):
        Dataset(
            "bad", torch.zeros(3, 1), torch.tensor([0, 1]), torch.zeros(1, 1), torch.tensor([0]), 2
        )
    with pytest.raises(ICSValueError, match="train and test inputs differ in shape"):
        Dataset(
            "bad", torch.zeros(2, 1), torch.tensor([0, 1]), torch.zeros(1, 2), torch.tensor([0]), 2
        )


# ----------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------
def test_flip_and_shift_against_a_loop():
    x = torch.randn(32, 2, 6, 5, generator=torch.Generator().manual_seed(0))
    out = flip_and_shift(x, torch.Generator().manual_seed(1), pad=2, flip=True)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    windows = {
        (dy, dx): padded[:, :, dy : dy + 6, dx : dx + 5] for dy in range(5) for dx in range(5)
    }
    kinds = set()
    for i in range(32):
        matches = [
            (key, flipped)
            for key, win in windows.items()
            for flipped in (False, True)
            if torch.equal(out[i], win[i].flip(2) if flipped else win[i])
        ]
        assert matches, i  # every output is a flipped or unflipped shifted window
        kinds.update(matches)
    assert len({k for k, _ in kinds}) > 5 and {f for _, f in kinds} == {False, True}
    again = flip_and_shift(x, torch.Generator().manual_seed(1), pad=2, flip=True)
    assert torch.equal(out, again)
    unchanged = flip_and_shift(x, torch.Generator().manual_seed(1), pad=0, flip=False)
    assert torch.equal(unchanged, x) and unchanged is not x


def test_flip_and_shift_errors():
    g = torch.Generator()
    with pytest.raises(ICSValueError, match=r"`x` must be images of shape \(N, C, H, W\)"):
        flip_and_shift(torch.zeros(2, 3), g)
    with pytest.raises(ICSValueError, match="`pad` must be an int >= 0"):
        flip_and_shift(torch.zeros(2, 1, 4, 4), g, pad=-1)
