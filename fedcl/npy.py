"""Flower `Array`s in .npy bytes, read and written fast (Flower's own `Array.numpy` re-parses the
header and `Array(ndarray)` runs `np.save`, each about 50 µs an array)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

_NPY_MAGIC = b"\x93NUMPY\x01\x00"  # .npy format 1.0, as np.save writes arrays this small
_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}
_prefixes: dict[tuple[str, tuple[int, ...]], bytes] = {}


def npy_values(data: bytes) -> np.ndarray:
    """The array in .npy bytes (Flower's `Array` format), read-only and without a copy.

    `np.load` parses the header text every time (~80 µs an array); replies to one round share a
    handful of headers, so each is parsed once and the values are viewed in place."""
    if not data.startswith(_NPY_MAGIC):
        return np.load(io.BytesIO(data), allow_pickle=False)
    end = 10 + int.from_bytes(data[8:10], "little")
    header = data[10:end]
    if header not in _headers:
        parsed = np.lib.format.read_array_header_1_0(io.BytesIO(data[8:end]))
        _headers[header] = (parsed[2], tuple(parsed[0]), bool(parsed[1]))
    dtype, shape, fortran = _headers[header]
    if dtype.hasobject:  # never unpickle: let numpy refuse it
        return np.load(io.BytesIO(data), allow_pickle=False)
    count = int(np.prod(shape, dtype=np.int64))
    values = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    return values.reshape(shape, order="F" if fortran else "C")


def npy_bytes(values: np.ndarray) -> bytes:
    """`values` as the .npy bytes `np.save` writes (C order), the header made once per dtype and
    shape."""
    if not values.flags.c_contiguous:
        values = values.copy(order="C")  # not np.ascontiguousarray: it makes 0-d arrays 1-d
    key = (values.dtype.str, values.shape)
    prefix = _prefixes.get(key)
    if prefix is None or values.dtype.hasobject:
        buffer = io.BytesIO()
        np.save(buffer, values, allow_pickle=False)
        data = buffer.getvalue()
        _prefixes[key] = data[: len(data) - values.nbytes]
        return data
    return prefix + values.tobytes()


def values_of(array: Array) -> np.ndarray:
    """The values of a Flower `Array` (read-only when decoded here: copy before changing them)."""
    if isinstance(array, DecodedArray):
        return array.numpy()
    return npy_values(array.data) if array.stype == "numpy.ndarray" else array.numpy()


class DecodedArray(Array):
    """A Flower `Array` that also holds its decoded values: `numpy()` returns them (read-only)
    instead of parsing the bytes again. It exists only inside one process: pickled (to another
    actor, the driver, a checkpoint), it is a plain Flower `Array` with the same bytes."""

    def numpy(self) -> np.ndarray:
        """The decoded values (read-only; copy before changing them)."""
        values = self.__dict__.get("_decoded")
        if values is None:
            values = npy_values(self.data) if self.stype == "numpy.ndarray" else super().numpy()
            values.flags.writeable = False
            self.__dict__["_decoded"] = values
        return values

    def __reduce__(self) -> tuple[Any, ...]:
        return (_plain_array, (self.dtype, self.shape, self.stype, self.data))


def _plain_array(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def decoded(array: Array) -> DecodedArray:
    """`array` as a `DecodedArray` (the bytes are shared, decoded once here)."""
    if isinstance(array, DecodedArray):
        return array
    copy_ = DecodedArray(dtype=array.dtype, shape=array.shape, stype=array.stype, data=array.data)
    copy_.numpy()
    return copy_


def array_of(values: np.ndarray) -> DecodedArray:
    """A Flower `Array` of a copy of `values`: what `Array(values)` makes (the same fields and
    bytes), without its per-argument validation; `numpy()` views the bytes, never parses them."""
    array = DecodedArray.__new__(DecodedArray)
    # Flower's Array keeps these four fields and a dirty flag in its __dict__ (flwr 1.41, pinned).
    array.__dict__.update(
        _is_dirty=True,
        dtype=str(values.dtype),
        shape=tuple(int(n) for n in values.shape),
        stype="numpy.ndarray",
        data=npy_bytes(values),
    )
    return array


def array_record_of(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ArrayRecord holding these very `Array` objects (`ArrayRecord(dict)` would copy each into
    a plain, undecoded Array)."""
    record = ArrayRecord()
    for name, array in arrays.items():
        record[name] = array
    return record
