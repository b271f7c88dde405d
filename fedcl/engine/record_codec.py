"""Flower records as plain numpy arrays: what a checkpoint stores, loadable without running code.

Every piece of state a checkpoint keeps is a Flower `RecordDict` (arrays, config and metric
records): the global arrays, a strategy's `state_dict()`, each node's `Context.state`. A set of
them, keyed by an integer row id (the node id), is encoded column-wise:

* rows with the same layout (the same records, keys, value types, dtypes and ranks) form a group;
* each value of the group is one column: the rows' values stacked when their shapes agree, else
  their concatenation with per-row offsets and shapes;
* strings and bytes are stored as uint8, lists as 1-D arrays; the layout is JSON;
* an array comes back in its memory order (C or Fortran): the same values in another layout can
  round differently in later arithmetic (FOT's bases come out of QR in Fortran order).

A thousand clients' replay buffers thus take a handful of arrays rather than thousands. The
encoding is a dict of numpy arrays (`np.savez`, read back by `np.load(..., allow_pickle=False)`)
plus a JSON layout stored beside them under `META`; no object is ever pickled.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedcl.npy import npy_bytes, values_of

FORMAT = 1
META = "meta"  # the npz member holding the JSON layout (uint8)
NUMPY = "numpy.ndarray"  # Flower's serialisation type of numpy arrays
_RECORD_KINDS = {ArrayRecord: "array", ConfigRecord: "config", MetricRecord: "metric"}
_SCALAR_TAGS = {bool: "bool", int: "int", float: "float"}  # bool first: bool is an int
_SCALAR_DTYPES = {"bool": np.bool_, "int": np.int64, "float": np.float64}

# A leaf's layout: (key, tag, ((dtype, ndim, order) per part)); a record's: (name, kind, leaves).
Leaf = tuple[str, str, tuple[tuple[str, int, str], ...]]
Layout = tuple[tuple[str, str, tuple[Leaf, ...]], ...]


class UnencodableError(TypeError):
    """A value that is not a Flower record value (never raised for valid Flower records)."""


def _scalar_tag(value: Any) -> str | None:
    for kind, tag in _SCALAR_TAGS.items():
        if type(value) is kind:
            return tag
    return None


def _encode_value(value: Any) -> tuple[str, list[np.ndarray]]:
    """A record value as (tag, parts): the parts are numpy arrays, the tag says how to rebuild."""
    if isinstance(value, Array):
        return "array", [values_of(value)]
    tag = _scalar_tag(value)
    if tag is not None:
        return tag, [np.asarray(value, dtype=_SCALAR_DTYPES[tag])]
    if isinstance(value, str):
        return "str", [np.frombuffer(value.encode(), dtype=np.uint8)]
    if isinstance(value, bytes):
        return "bytes", [np.frombuffer(value, dtype=np.uint8)]
    if isinstance(value, list):
        if not value:
            return "list[]", []
        tags = {_scalar_tag(v) for v in value}
        if len(tags) == 1 and None not in tags:
            tag = tags.pop()
            return f"list[{tag}]", [np.asarray(value, dtype=_SCALAR_DTYPES[tag])]
        if all(isinstance(v, str) for v in value):
            items = [v.encode() for v in value]
            tag = "list[str]"
        elif all(isinstance(v, bytes) for v in value):
            items, tag = list(value), "list[bytes]"
        else:
            raise UnencodableError(
                f"a list mixing types {sorted({type(v).__name__ for v in value})}"
            )
        lengths = np.asarray([len(i) for i in items], dtype=np.int64)
        return tag, [np.frombuffer(b"".join(items), dtype=np.uint8), lengths]
    raise UnencodableError(f"a value of type {type(value).__name__}")


def _decode_value(tag: str, parts: list[np.ndarray]) -> Any:
    if tag == "array":
        value = parts[0]
        if value.flags.f_contiguous and not value.flags.c_contiguous:
            return Array(value)  # np.save keeps Fortran order
        data = npy_bytes(value)  # fast: the header is made once per dtype and shape
        return Array(dtype=str(value.dtype), shape=value.shape, stype=NUMPY, data=data)
    if tag in _SCALAR_DTYPES:
        return {"bool": bool, "int": int, "float": float}[tag](parts[0])
    if tag == "str":
        return parts[0].tobytes().decode()
    if tag == "bytes":
        return parts[0].tobytes()
    if tag == "list[]":
        return []
    if tag in ("list[str]", "list[bytes]"):
        data, lengths = parts[0].tobytes(), parts[1]
        ends = np.cumsum(lengths).tolist()
        items = [data[end - n : end] for end, n in zip(ends, lengths.tolist(), strict=True)]
        return [i.decode() for i in items] if tag == "list[str]" else items
    if tag.startswith("list["):
        return parts[0].tolist()
    raise ValueError(f"unknown value tag {tag!r} in a checkpoint")


def _order(array: np.ndarray) -> str:
    """ "F" for an array laid out in Fortran order only, else "C"."""
    return "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"


def _encode_row(state: RecordDict) -> tuple[Layout, list[np.ndarray]]:
    """One RecordDict as its layout and the flat list of its parts (in layout order)."""
    layout, parts = [], []
    for name, record in state.items():
        kind = _RECORD_KINDS.get(type(record))
        if kind is None:
            raise UnencodableError(f"record {name!r} of type {type(record).__name__}")
        leaves = []
        for key, value in record.items():
            try:
                tag, value_parts = _encode_value(value)
            except UnencodableError as exc:
                raise UnencodableError(f"record {name!r}, key {key!r}: {exc}") from None
            leaves.append((key, tag, tuple((p.dtype.str, p.ndim, _order(p)) for p in value_parts)))
            parts.extend(value_parts)
        layout.append((name, kind, tuple(leaves)))
    return tuple(layout), parts


def encode_records(states: Mapping[int, RecordDict]) -> dict[str, np.ndarray]:
    """`states` (row id -> RecordDict) as named numpy arrays, the JSON layout under `META`.

    Raises `UnencodableError` for something that is not a Flower record (a Flower RecordDict
    always encodes). Rows come back from `decode_records` in ascending id order.
    """
    groups: dict[Layout, tuple[list[int], list[list[np.ndarray]]]] = {}
    for row in sorted(states):
        layout, parts = _encode_row(states[row])
        ids, rows = groups.setdefault(layout, ([], []))
        ids.append(int(row))
        rows.append(parts)
    arrays: dict[str, np.ndarray] = {}
    meta_groups = []
    for g, (layout, (ids, rows)) in enumerate(groups.items()):
        arrays[f"g{g}.rows"] = np.asarray(ids, dtype=np.int64)
        for c, column in enumerate(zip(*rows, strict=True)):
            name = f"g{g}.c{c}"
            shapes = {v.shape for v in column}
            if len(shapes) == 1:
                arrays[name] = np.stack(column)
            else:
                arrays[name] = np.concatenate([v.ravel() for v in column])
                sizes = np.asarray([v.size for v in column], dtype=np.int64)
                arrays[name + ".offsets"] = np.concatenate([[0], np.cumsum(sizes)])
                arrays[name + ".shapes"] = np.asarray([v.shape for v in column], dtype=np.int64)
        meta_groups.append(layout)
    meta = {"format": FORMAT, "groups": meta_groups}
    arrays[META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return arrays


def merge_encoded(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Encodings of disjoint row sets (e.g. one per actor) as one encoding; no data is copied."""
    merged: dict[str, np.ndarray] = {}
    groups: list[Any] = []
    for part in parts:
        layout = _read_meta(part)["groups"]
        for g in range(len(layout)):
            prefix, new = f"g{g}.", f"g{len(groups) + g}."
            for name, value in part.items():
                if name.startswith(prefix):
                    merged[new + name[len(prefix) :]] = value
        groups.extend(layout)
    merged[META] = np.frombuffer(
        json.dumps({"format": FORMAT, "groups": groups}).encode(), dtype=np.uint8
    )
    return merged


def _read_meta(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    meta = json.loads(np.asarray(arrays[META]).tobytes().decode())
    if meta.get("format") != FORMAT:
        raise ValueError(f"record encoding format {meta.get('format')!r}, expected {FORMAT}")
    return meta


def decode_records(arrays: Mapping[str, np.ndarray]) -> dict[int, RecordDict]:
    """The RecordDicts `encode_records` encoded (row id -> RecordDict, ids ascending)."""
    states: dict[int, RecordDict] = {}
    for g, layout in enumerate(_read_meta(arrays)["groups"]):
        ids = np.asarray(arrays[f"g{g}.rows"]).tolist()
        columns = []
        for c in range(sum(len(parts) for _, _, leaves in layout for _, _, parts in leaves)):
            name = f"g{g}.c{c}"
            values = np.asarray(arrays[name])
            if name + ".offsets" in arrays:
                offsets = np.asarray(arrays[name + ".offsets"]).tolist()
                shapes = np.asarray(arrays[name + ".shapes"]).tolist()
                columns.append(
                    [
                        values[offsets[i] : offsets[i + 1]].reshape(shapes[i])
                        for i in range(len(ids))
                    ]
                )
            else:
                columns.append(list(values))
        for i, row in enumerate(ids):
            state, c = RecordDict(), 0
            for record_name, kind, leaves in layout:
                values = {}
                for key, tag, parts in leaves:
                    values[key] = _decode_value(
                        tag,
                        [
                            np.asfortranarray(columns[c + p][i])
                            if order == "F"
                            else columns[c + p][i]
                            for p, (_, _, order) in enumerate(parts)
                        ],
                    )
                    c += len(parts)
                record_type = {"array": ArrayRecord, "config": ConfigRecord}.get(kind, MetricRecord)
                state[record_name] = record_type(values)
            states[int(row)] = state
    return dict(sorted(states.items()))


def to_npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """`arrays` as the bytes of an uncompressed .npz (plain arrays only: no object dtype)."""
    for name, value in arrays.items():
        if value.dtype.hasobject:
            raise UnencodableError(f"array {name!r} has object dtype")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def from_npz_bytes(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an .npz, read with `allow_pickle=False` (a pickled member raises)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
