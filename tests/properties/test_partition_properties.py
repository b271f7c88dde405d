"""Property: every partition scheme gives every sample to exactly one client, honours the minimum
per client, and is a function of the generator's state alone."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcl.errors import ConfigError
from fedcl.scenario.partition import PARTITIONS, partition_indices, partition_packed


@st.composite
def splits(draw: st.DrawFn) -> dict:
    num_classes = draw(st.integers(1, 12))
    return {
        "labels": np.asarray(
            draw(st.lists(st.integers(0, num_classes - 1), min_size=0, max_size=300)),
            dtype=np.int64,
        ),
        "num_clients": draw(st.integers(1, 25)),
        "scheme": draw(st.sampled_from(PARTITIONS)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "alpha": draw(st.floats(0.01, 1000.0)),
        "shards_per_client": draw(st.integers(1, 4)),
        "min_per_client": draw(st.integers(0, 3)),
    }


def split(case: dict) -> list[np.ndarray]:
    return partition_indices(
        case["labels"],
        case["num_clients"],
        case["scheme"],
        np.random.default_rng(case["seed"]),
        alpha=case["alpha"],
        shards_per_client=case["shards_per_client"],
        min_per_client=case["min_per_client"],
    )


@settings(max_examples=100)
@given(splits())
def test_a_partition_covers_every_sample_exactly_once(case: dict) -> None:
    n, clients, minimum = len(case["labels"]), case["num_clients"], case["min_per_client"]
    if n < clients * minimum:
        with pytest.raises(ConfigError, match="cannot give"):
            split(case)
        return
    parts = split(case)
    assert len(parts) == clients
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no sample twice in a client
        assert len(part) >= minimum
    together = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    np.testing.assert_array_equal(np.sort(together), np.arange(n))  # no overlap, nothing lost
    # the same generator state gives the same split; the packed form says the same
    again = split(case)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    positions, offsets = partition_packed(
        case["labels"],
        clients,
        case["scheme"],
        np.random.default_rng(case["seed"]),
        alpha=case["alpha"],
        shards_per_client=case["shards_per_client"],
        min_per_client=minimum,
    )
    assert offsets[0] == 0 and offsets[-1] == n and np.all(np.diff(offsets) >= 0)
    for c, part in enumerate(parts):
        np.testing.assert_array_equal(positions[offsets[c] : offsets[c + 1]], part)
