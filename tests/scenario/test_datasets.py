"""`load_dataset`: built-in datasets, and folder datasets read from files in the real formats."""

from __future__ import annotations

import gzip
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from fedcl.errors import ConfigError, DatasetError
from fedcl.scenario.datasets import DATASETS, ArrayDataset, load_dataset

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _same(a: ArrayDataset, b: ArrayDataset) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f))
        for f in ("x_train", "y_train", "x_test", "y_test")
    )


def _check_invariants(ds: ArrayDataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and x.flags.c_contiguous
        assert x.shape == (len(y), *ds.input_shape)
        assert y.dtype == np.int64 and y.min() >= 0 and y.max() < ds.num_classes


# --- built-in datasets ---------------------------------------------------------------------------


def test_digits_is_the_full_sklearn_set_scaled_and_stratified() -> None:
    ds = load_dataset("digits", seed=0)
    _check_invariants(ds)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    for x in (ds.x_train, ds.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    # stratified: every class is about test_fraction in the test split
    train_counts, test_counts = np.bincount(ds.y_train), np.bincount(ds.y_test)
    fractions = test_counts / (train_counts + test_counts)
    assert np.all(np.abs(fractions - 0.25) < 0.01)
    assert len(ds.y_test) == pytest.approx(0.25 * 1797, abs=5)


def test_digits_split_depends_on_seed_and_fraction_only() -> None:
    a, b, c = (load_dataset("digits", seed=s, test_fraction=0.5) for s in (3, 3, 4))
    assert _same(a, b) and not _same(a, c)
    assert len(a.y_test) == pytest.approx(1797 / 2, abs=5)
    # train and test together are exactly the sklearn images, each used once
    from sklearn.datasets import load_digits

    ours = np.concatenate([a.x_train, a.x_test]).reshape(-1, 64) * 16
    original = load_digits().data.astype(np.float32)
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(original, axis=0))
    assert len(ours) == len(original)
    np.testing.assert_array_equal(
        np.sort(np.concatenate([a.y_train, a.y_test])), np.sort(load_digits().target)
    )


def test_mnist1d_is_reproducible_and_leaves_global_rng_untouched() -> None:
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state(), random.getstate()
    a = load_dataset("mnist1d", seed=5, num_samples=300)
    np_after = np.random.get_state()
    assert all(np.array_equal(x, y) for x, y in zip(np_before, np_after, strict=True))
    assert random.getstate() == py_before
    b = load_dataset("mnist1d", seed=5, num_samples=300)
    c = load_dataset("mnist1d", seed=6, num_samples=300)
    assert _same(a, b) and not _same(a, c)
    _check_invariants(a)
    assert a.input_shape == (1, 40) and a.num_classes == 10
    assert (len(a.y_train), len(a.y_test)) == (240, 60)


def test_gaussian_classes_are_separable_but_not_trivially() -> None:
    ds = load_dataset("gaussian", seed=0)
    _check_invariants(ds)
    assert ds.input_shape == (20,) and ds.num_classes == 10
    assert np.all(np.bincount(ds.y_train) == 200) and np.all(np.bincount(ds.y_test) == 100)
    means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)])
    nearest = np.argmin(((ds.x_test[:, None] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = (nearest == ds.y_test).mean()
    assert 0.5 < accuracy < 0.98


def test_gaussian_options_shape_the_data() -> None:
    ds = load_dataset(
        "gaussian",
        seed=1,
        num_classes=4,
        dim=3,
        train_per_class=5,
        test_per_class=2,
        separation=1.0,
    )
    assert ds.x_train.shape == (20, 3) and ds.x_test.shape == (8, 3) and ds.num_classes == 4
    assert _same(
        ds,
        load_dataset(
            "gaussian",
            seed=1,
            num_classes=4,
            dim=3,
            train_per_class=5,
            test_per_class=2,
            separation=1.0,
        ),
    )


def test_max_train_and_max_test_take_a_seeded_subset() -> None:
    full = load_dataset("gaussian", seed=2)
    small = load_dataset("gaussian", seed=2, max_train=50, max_test=7)
    assert (len(small.y_train), len(small.y_test)) == (50, 7)
    assert _same(small, load_dataset("gaussian", seed=2, max_train=50, max_test=7))
    full_rows = {
        row.tobytes(): label for row, label in zip(full.x_train, full.y_train, strict=True)
    }
    assert all(
        full_rows[r.tobytes()] == y for r, y in zip(small.x_train, small.y_train, strict=True)
    )
    # a limit above the size keeps everything
    assert _same(full, load_dataset("gaussian", seed=2, max_train=10**6))


# --- errors --------------------------------------------------------------------------------------


def test_unknown_dataset_lists_the_valid_names() -> None:
    with pytest.raises(DatasetError, match=", ".join(DATASETS)):
        load_dataset("imagenet")


def test_unknown_option_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"num_sample\b.*'mnist1d'.*num_samples, max_train"):
        load_dataset("mnist1d", num_sample=10)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("digits", {"test_fraction": 1.0}),
        ("gaussian", {"dim": 0}),
        ("gaussian", {"separation": -1.0}),
        ("gaussian", {"num_classes": True}),
        ("mnist1d", {"num_samples": 5}),
        ("digits", {"max_train": 0}),
        ("cifar100", {"label_kind": "medium"}),  # checked before the missing root
    ],
)
def test_bad_option_values_raise_config_error(name: str, options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match=next(iter(options))):
        load_dataset(name, **options)


def test_negative_seed_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="seed"):
        load_dataset("gaussian", seed=-1)


def test_array_dataset_checks_its_promises() -> None:
    x = np.zeros((2, 3), dtype=np.float64)
    y = np.zeros(2, dtype=np.int64)
    with pytest.raises(DatasetError, match="float32"):
        ArrayDataset("d", x, y, x, y, num_classes=2, input_shape=(3,))
    with pytest.raises(DatasetError, match="outside"):
        ArrayDataset("d", x.astype(np.float32), y + 5, x.astype(np.float32), y, 2, (3,))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_folder_dataset_without_root_names_the_files_it_needs(name: str) -> None:
    expected = "train-images-idx3-ubyte" if "mnist" in name else "test"
    with pytest.raises(DatasetError, match=f"root=.*{expected}"):
        load_dataset(name)


def test_missing_folder_message_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DatasetError, match=f"{missing} does not exist.*t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=missing)


# --- MNIST / Fashion-MNIST from idx files --------------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    """An idx ubyte file, packed by hand so the reader is checked against the format itself."""
    magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (n_train, 28, 28)),
        IDX_FILES[1]: rng.integers(0, 10, n_train),
        IDX_FILES[2]: rng.integers(0, 256, (n_test, 28, 28)),
        IDX_FILES[3]: rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, array) in enumerate(arrays.items()):
        payload = _idx(array)
        if gz and i % 2 == 0:  # a mix of compressed and plain files, as users have them
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    return arrays


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_mnist_like_reads_idx_files_and_scales(tmp_path: Path, name: str) -> None:
    raw = _write_mnist(tmp_path)
    ds = load_dataset(name, root=str(tmp_path))
    _check_invariants(ds)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    np.testing.assert_allclose(ds.x_train[:, 0], raw[IDX_FILES[0]] / 255, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train, raw[IDX_FILES[1]])
    np.testing.assert_allclose(ds.x_test[:, 0], raw[IDX_FILES[2]] / 255, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, raw[IDX_FILES[3]])
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1


def test_mnist_found_in_torchvision_layout(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    assert len(load_dataset("mnist", root=tmp_path).y_train) == 12


def test_mnist_folder_missing_a_file_names_it(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match=f"{tmp_path} lacks t10k-labels-idx1-ubyte;"):
        load_dataset("mnist", root=tmp_path)


def test_mnist_truncated_file_raises(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False)
    path = tmp_path / IDX_FILES[2]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("mnist", root=tmp_path)


def test_mnist_label_count_mismatch_raises(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False)
    (tmp_path / IDX_FILES[1]).write_bytes(_idx(np.zeros(11, dtype=np.uint8)))
    with pytest.raises(DatasetError, match="expected 12 labels"):
        load_dataset("mnist", root=tmp_path)


# --- CIFAR-10 / CIFAR-100 from python pickle batches ---------------------------------------------


def _cifar_data(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _pickle(path: Path, batch: dict[bytes, object]) -> None:
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_reads_batches_in_archive_subfolder(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in np.random.default_rng(i).integers(0, 10, 4)],
            b"data": _cifar_data(4, i),
            b"filenames": [b"x.png"] * 4,
        }
        _pickle(folder / name, batch)
        batches[name] = batch
    ds = load_dataset("cifar10", root=tmp_path)
    _check_invariants(ds)
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10
    assert (len(ds.y_train), len(ds.y_test)) == (20, 4)
    first = batches["data_batch_1"]
    # rows hold the red plane, then green, then blue, each 32 rows of 32 pixels
    np.testing.assert_allclose(ds.x_train[0, 0, 0], first[b"data"][0, :32] / 255, rtol=1e-6)
    np.testing.assert_allclose(ds.x_train[0, 2, 31], first[b"data"][0, -32:] / 255, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_train[:4], first[b"labels"])
    np.testing.assert_array_equal(ds.y_train[16:], batches["data_batch_5"][b"labels"])
    np.testing.assert_array_equal(ds.y_test, batches["test_batch"][b"labels"])


@pytest.mark.parametrize(("kind", "num_classes"), [("fine", 100), ("coarse", 20)])
def test_cifar100_label_kinds(tmp_path: Path, kind: str, num_classes: int) -> None:
    for i, name in enumerate(["train", "test"]):
        fine = [99, 0, 42, 7, 13][: 5 - i]
        _pickle(
            tmp_path / name,
            {
                b"data": _cifar_data(len(fine), i),
                b"fine_labels": fine,
                b"coarse_labels": [f // 5 for f in fine],
            },
        )
    ds = load_dataset("cifar100", root=tmp_path, label_kind=kind)
    _check_invariants(ds)
    assert ds.num_classes == num_classes
    expected = [99, 0, 42, 7, 13] if kind == "fine" else [19, 0, 8, 1, 2]
    np.testing.assert_array_equal(ds.y_train, expected)


def test_cifar_label_out_of_range_raises(tmp_path: Path) -> None:
    for name in ("train", "test"):
        _pickle(
            tmp_path / name,
            {b"data": _cifar_data(1, 0), b"fine_labels": [3], b"coarse_labels": [20]},
        )
    with pytest.raises(DatasetError, match="coarse_labels"):
        load_dataset("cifar100", root=tmp_path, label_kind="coarse")
