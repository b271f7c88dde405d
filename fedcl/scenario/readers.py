"""Readers for the on-disk formats of the folder datasets: idx (MNIST) and CIFAR pickle batches.

These are pure format readers: they return the stored values unscaled and leave shapes and label
ranges to the dataset loaders. Anything malformed raises `DatasetError` naming the file.
"""

from __future__ import annotations

import codecs
import gzip
import io
import math
import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from fedcl.errors import DatasetError

try:
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]

__all__ = ["read_cifar_batch", "read_idx", "write_idx"]

# idx type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); values are big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[np.dtype, int] = {
    dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()
}
_GZIP_MAGIC = b"\x1f\x8b"

PathLike = str | os.PathLike[str]


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the file starts with the gzip magic number."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"file not found: {path}") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({exc})") from None


def read_idx(path: PathLike) -> np.ndarray:
    """Read an idx file (plain or gzip-compressed) into an array in native byte order.

    Supports every idx element type (ubyte, sbyte, short, int, float, double). The header's
    dimensions must account for exactly the bytes in the file; a wrong magic number, an unknown
    type code, or a truncated or over-long file raises `DatasetError` naming the path.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: not an idx file (only {len(data)} bytes, header needs 4)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DatasetError(f"{path}: not an idx file (magic number must start with two zero bytes)")
    if code not in _IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DatasetError(f"{path}: unknown idx type code 0x{code:02X}; valid codes: {valid}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(f"{path}: truncated idx header ({len(data)} bytes, need {header_len})")
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[code]
    expected = header_len + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: idx file {problem}: {len(data)} bytes, header shape {shape} needs {expected}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array: np.ndarray) -> None:
    """Write `array` as an idx file; gzip-compress it when `path` ends in ``.gz``.

    The array's dtype must be one idx can hold (uint8, int8, int16, int32, float32, float64) and
    it must have 1 to 255 dimensions; otherwise `DatasetError`. `read_idx` returns an equal array.
    """
    path = Path(path)
    array = np.asarray(array)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        valid = ", ".join(str(d) for d in _IDX_CODES)
        raise DatasetError(f"cannot write dtype {array.dtype} to idx {path}; valid dtypes: {valid}")
    if not 1 <= array.ndim <= 255:
        raise DatasetError(f"cannot write a {array.ndim}-d array to idx {path}; need 1 to 255 dims")
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    payload = header + array.astype(_IDX_DTYPES[code], copy=False).tobytes(order="C")
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload)
    path.write_bytes(payload)


# The globals a CIFAR batch may reference: numpy array reconstruction and, for pickles written by
# Python 3 at protocol 2, `_codecs.encode` for bytes. Anything else is refused, so a hostile file
# cannot run code when it is loaded.
_PICKLE_GLOBALS: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): codecs.encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _module in ("numpy.core", "numpy._core"):
    _PICKLE_GLOBALS[(f"{_module}.multiarray", "_reconstruct")] = _np_multiarray._reconstruct
    _PICKLE_GLOBALS[(f"{_module}.multiarray", "scalar")] = _np_multiarray.scalar
    _PICKLE_GLOBALS[(f"{_module}.numeric", "_frombuffer")] = _np_numeric._frombuffer


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None


_CIFAR_LABEL_KEYS = ("labels", "fine_labels", "coarse_labels")


def read_cifar_batch(path: PathLike) -> dict[str, np.ndarray]:
    """Read one CIFAR-10/100 python pickle batch.

    Returns ``{"data": uint8 array (N, 3072), "labels": int64 array (N,)}``, plus
    ``"fine_labels"`` and ``"coarse_labels"`` when the file has them (CIFAR-100); for CIFAR-100,
    ``"labels"`` is the fine labels. The pickle may reference only numpy array constructors. A file
    that is not such a batch raises `DatasetError` naming the path.
    """
    path = Path(path)
    raw = _read_bytes(path)
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a malformed pickle can fail in many ways; all mean "not a batch"
        raise DatasetError(f"{path}: not a CIFAR python batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: not a CIFAR python batch (a {type(batch).__name__})")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch:
        raise DatasetError(f"{path}: CIFAR batch has no b'data' entry; keys: {sorted(batch)}")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(
            f"{path}: CIFAR b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    result: dict[str, np.ndarray] = {"data": data}
    for key in _CIFAR_LABEL_KEYS:
        if key in batch:
            labels = np.asarray(batch[key])
            if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
                raise DatasetError(
                    f"{path}: CIFAR b'{key}' must be {len(data)} integers, got shape {labels.shape}"
                )
            result[key] = labels.astype(np.int64)
    if "labels" not in result:
        if "fine_labels" not in result:
            keys = ", ".join(f"b'{k}'" for k in _CIFAR_LABEL_KEYS)
            raise DatasetError(f"{path}: CIFAR batch has no labels; expected one of {keys}")
        result["labels"] = result["fine_labels"]
    return result
