"""The idx and CIFAR readers on small files written in the real formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from fedcl.errors import DatasetError
from fedcl.scenario.readers import read_cifar_batch, read_idx, write_idx


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["a-idx", "a-idx.gz"])
def test_write_then_read_idx_round_trips(tmp_path: Path, dtype: type, name: str) -> None:
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_read_idx_parses_a_hand_packed_mnist_header(tmp_path: Path) -> None:
    # Magic 0x00000803 (ubyte, 3 dims) then big-endian dims, as in train-images-idx3-ubyte.
    pixels = bytes(range(2 * 2 * 3))
    (tmp_path / "img").write_bytes(struct.pack(">IIII", 0x803, 2, 2, 3) + pixels)
    (tmp_path / "lab.gz").write_bytes(gzip.compress(struct.pack(">II", 0x801, 2) + b"\x07\x02"))
    np.testing.assert_array_equal(read_idx(tmp_path / "img").ravel(), np.arange(12))
    assert read_idx(tmp_path / "img").shape == (2, 2, 3)
    np.testing.assert_array_equal(read_idx(tmp_path / "lab.gz"), [7, 2])


def test_write_idx_writes_big_endian(tmp_path: Path) -> None:
    write_idx(tmp_path / "x", np.array([1, 256], dtype=np.int32))
    assert (tmp_path / "x").read_bytes() == struct.pack(">HBBI", 0, 0x0C, 1, 2) + struct.pack(
        ">ii", 1, 256
    )


@pytest.mark.parametrize("cut", [3, 10, 40])
def test_truncated_idx_raises_naming_the_file(tmp_path: Path, cut: int) -> None:
    write_idx(tmp_path / "full", np.zeros((4, 4, 4), dtype=np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "full").read_bytes()[:cut])
    with pytest.raises(DatasetError, match="short"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (struct.pack(">HBBI", 1, 0x08, 1, 1) + b"\x00", "magic"),
        (struct.pack(">HBBI", 0, 0x07, 1, 1) + b"\x00", "type code"),
        (struct.pack(">HBBI", 0, 0x08, 1, 1) + b"\x00\x00", "trailing"),
        (gzip.compress(struct.pack(">HBBI", 0, 0x08, 1, 1) + b"\x00")[:-6], "gzip"),
    ],
)
def test_malformed_idx_raises(tmp_path: Path, payload: bytes, problem: str) -> None:
    (tmp_path / "bad").write_bytes(payload)
    with pytest.raises(DatasetError, match=problem):
        read_idx(tmp_path / "bad")


def test_missing_idx_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nothere"):
        read_idx(tmp_path / "nothere")


def test_write_idx_refuses_dtypes_idx_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="valid dtypes"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


def _write_batch(
    path: Path, batch: dict[bytes, object], protocol: int = pickle.HIGHEST_PROTOCOL
) -> None:
    path.write_bytes(pickle.dumps(batch, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_read_cifar10_batch(tmp_path: Path, protocol: int) -> None:
    data = np.random.default_rng(0).integers(0, 256, (5, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1, 4, 1, 5], b"data": data}
    _write_batch(tmp_path / "data_batch_1", batch, protocol)
    got = read_cifar_batch(tmp_path / "data_batch_1")
    np.testing.assert_array_equal(got["data"], data)
    assert got["labels"].dtype == np.int64
    np.testing.assert_array_equal(got["labels"], [3, 1, 4, 1, 5])


def test_read_cifar100_batch_keeps_fine_and_coarse(tmp_path: Path) -> None:
    data = np.zeros((3, 3072), dtype=np.uint8)
    batch = {b"data": data, b"fine_labels": [99, 0, 42], b"coarse_labels": [19, 0, 7]}
    _write_batch(tmp_path / "train", batch)
    got = read_cifar_batch(tmp_path / "train")
    np.testing.assert_array_equal(got["fine_labels"], [99, 0, 42])
    np.testing.assert_array_equal(got["coarse_labels"], [19, 0, 7])
    np.testing.assert_array_equal(got["labels"], got["fine_labels"])


def test_cifar_reader_refuses_pickles_that_call_arbitrary_code(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            # os.system, not print: Ray swaps builtins.print for its own once it has started.
            return (os.system, ("echo pwned",))

    _write_batch(tmp_path / "evil", {b"data": Evil()})  # type: ignore[dict-item]
    with pytest.raises(DatasetError, match=r"refusing global (posix|os)\.system"):
        read_cifar_batch(tmp_path / "evil")


@pytest.mark.parametrize(
    "batch",
    [
        {b"labels": [1]},
        {b"data": np.zeros((1, 100), np.uint8), b"labels": [1]},
        {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]},
        {b"data": np.zeros((1, 3072), np.uint8)},
    ],
)
def test_malformed_cifar_batch_raises(tmp_path: Path, batch: dict[bytes, object]) -> None:
    _write_batch(tmp_path / "b", batch)
    with pytest.raises(DatasetError, match="CIFAR"):
        read_cifar_batch(tmp_path / "b")


def test_non_pickle_cifar_file_raises(tmp_path: Path) -> None:
    (tmp_path / "b").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="not a CIFAR"):
        read_cifar_batch(tmp_path / "b")
