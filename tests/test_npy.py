"""Fast reading of Flower Array bytes gives what Flower's own decoding gives."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from flwr.app import Array

from fedcl.engine.flower_compat import decoded
from fedcl.npy import array_of, npy_values

ARRAYS = [
    np.random.default_rng(0).random((256, 256), dtype=np.float32),
    np.arange(7),
    np.zeros((0, 3), np.float32),
    np.asfortranarray(np.random.default_rng(1).random((3, 4))),
    np.array(3.5),
    np.random.default_rng(2).random((2, 3, 4)),
    np.array([True, False]),
    np.arange(6, dtype=">i4").reshape(2, 3),
]


@pytest.mark.parametrize("values", ARRAYS, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_fast_decoding_equals_flowers(values):
    array = Array(values)
    fast, slow = npy_values(array.data), array.numpy()
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)
    # The engine's decoded arrays: same values, read-only, the same bytes for Flower.
    held = decoded(array)
    np.testing.assert_array_equal(held.numpy(), slow)
    assert not held.numpy().flags.writeable and held.data == array.data


@pytest.mark.parametrize("values", ARRAYS, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_fast_writing_equals_flowers(values):
    made, flowers = array_of(values), Array(values)
    assert (made.dtype, made.shape, made.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    np.testing.assert_array_equal(
        Array(made.dtype, made.shape, made.stype, made.data).numpy(), values
    )
    if values.flags.c_contiguous:
        assert made.data == flowers.data


def test_a_decoded_array_leaves_the_process_as_a_plain_flower_array():
    values = ARRAYS[0]
    travelled = pickle.loads(pickle.dumps(array_of(values)))
    assert type(travelled) is Array
    np.testing.assert_array_equal(travelled.numpy(), values)
    assert travelled.object_id == Array(values).object_id
