"""Property: removing any set of examples from a prototype bank (as per-client banks merged in any
order, then some subtracted) gives exactly the bank recomputed from the examples that remain."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fedcl.strategies.prototypes.math import PrototypeBank


@st.composite
def deletions(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, 60))
    classes = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return {
        "embeddings": rng.normal(scale=scale, size=(n, draw(st.integers(1, 6)))),
        "labels": rng.integers(0, classes, n),
        "classes": classes,
        "clients": rng.integers(0, draw(st.integers(1, 5)), n),  # who holds each example
        "deleted": np.asarray(draw(st.lists(st.booleans(), min_size=n, max_size=n))),
        "order": rng.permutation(5),
    }


@given(deletions())
def test_removal_equals_recomputation_for_any_deletion_set(case: dict) -> None:
    e, y, k = case["embeddings"], case["labels"], case["classes"]
    gone, clients = case["deleted"], case["clients"]
    bank = PrototypeBank.empty(k, e.shape[1])
    for client in case["order"]:  # the server merges client banks in any order
        mine = clients == client
        bank = bank.merged(PrototypeBank.from_embeddings(e[mine], y[mine], k))
    for client in case["order"][::-1]:  # each client's deleted examples removed apart
        mine = (clients == client) & gone
        bank = bank.without(PrototypeBank.from_embeddings(e[mine], y[mine], k))
    kept = PrototypeBank.from_embeddings(e[~gone], y[~gone], k)
    np.testing.assert_array_equal(bank.counts, kept.counts)
    empty = kept.counts == 0
    assert np.all(bank.sums[empty] == 0)  # a class with nothing left is unknown again
    assert np.all(np.isnan(bank.prototypes()[empty]))
    tolerance = 1e-9 * np.abs(e).max() * len(e)
    np.testing.assert_allclose(bank.sums, kept.sums, rtol=0, atol=tolerance)
    known = ~empty
    # the prototypes are the class means of what remains, computed here directly
    for label in np.flatnonzero(known):
        mean = e[~gone & (y == label)].mean(axis=0)
        np.testing.assert_allclose(bank.prototypes()[label], mean, rtol=0, atol=tolerance)
