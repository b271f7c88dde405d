"""Fast reading of Flower Array bytes gives what Flower's own decoding gives."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from fedcl.engine.flower_compat import decoded
from fedcl.npy import npy_values

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
