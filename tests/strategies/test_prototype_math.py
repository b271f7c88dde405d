"""Prototype banks: federated merges and removals equal central class means."""

import itertools
import re

import numpy as np
import pytest

from fedcl.strategies.prototypes.math import PrototypeBank, running_mean_update

NUM_CLASSES, DIM = 6, 5


def data(n: int = 120, seed: int = 0, num_classes: int = NUM_CLASSES):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes - 1, size=n)  # the last class is never seen
    embeddings = rng.normal(size=(n, DIM)) + labels[:, None]
    return embeddings.astype(np.float32), labels


def central_means(embeddings, labels, num_classes=NUM_CLASSES):
    means = np.full((num_classes, embeddings.shape[1]), np.nan)
    for c in range(num_classes):
        if np.any(labels == c):
            means[c] = embeddings[labels == c].astype(np.float64).mean(axis=0)
    return means


def split(n: int, parts: int, seed: int):
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, n), parts - 1, replace=False))
    return np.split(np.random.default_rng(seed + 1).permutation(n), cuts)


def assert_same_prototypes(got, expected):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("parts,seed", [(2, 0), (3, 1), (5, 2)])
def test_federated_merge_equals_central_means_in_any_order(parts, seed):
    embeddings, labels = data(seed=seed)
    banks = [
        PrototypeBank.from_embeddings(embeddings[idx], labels[idx], NUM_CLASSES)
        for idx in split(len(labels), parts, seed)
    ]
    expected = central_means(embeddings, labels)
    for order in itertools.islice(itertools.permutations(banks), 6):
        merged = PrototypeBank.empty(NUM_CLASSES, DIM)
        for bank in order:
            merged = merged.merged(bank)
        assert_same_prototypes(merged.prototypes(), expected)
        np.testing.assert_array_equal(merged.counts, np.bincount(labels, minlength=NUM_CLASSES))


def test_removing_a_client_equals_means_without_its_data():
    embeddings, labels = data(seed=3)
    parts = split(len(labels), 4, seed=3)
    banks = [PrototypeBank.from_embeddings(embeddings[i], labels[i], NUM_CLASSES) for i in parts]
    merged = banks[0].merged(banks[1]).merged(banks[2]).merged(banks[3])
    kept = np.concatenate([parts[0], parts[1], parts[3]])
    assert_same_prototypes(
        merged.without(banks[2]).prototypes(), central_means(embeddings[kept], labels[kept])
    )


def test_removing_the_only_examples_of_a_class_makes_it_unknown():
    bank = PrototypeBank.from_embeddings(np.ones((3, 2)), np.array([0, 0, 1]), 3)
    part = PrototypeBank.from_embeddings(np.ones((1, 2)), np.array([1]), 3)
    removed = bank.without(part)
    assert removed.counts.tolist() == [2, 0, 0]
    assert np.all(removed.sums[1] == 0) and np.all(np.isnan(removed.prototypes()[1]))


def test_removal_refuses_to_go_below_zero_counts():
    bank = PrototypeBank.from_embeddings(np.ones((2, 2)), np.array([0, 1]), 3)
    other = PrototypeBank.from_embeddings(np.ones((2, 2)), np.array([1, 1]), 3)
    with pytest.raises(ValueError, match=r"classes \[1\]"):
        bank.without(other)


def test_unseen_classes_have_nan_prototypes_and_are_never_predicted():
    embeddings, labels = data(seed=4)
    bank = PrototypeBank.from_embeddings(embeddings, labels, NUM_CLASSES)
    assert np.all(np.isnan(bank.prototypes()[NUM_CLASSES - 1]))
    far = np.full((3, DIM), 1e3)
    assert np.all(bank.predict(far) != NUM_CLASSES - 1)


def test_predict_matches_brute_force():
    embeddings, labels = data(seed=5)
    bank = PrototypeBank.from_embeddings(embeddings, labels, NUM_CLASSES)
    queries = np.random.default_rng(6).normal(size=(200, DIM)) * 3 + 2
    protos = bank.prototypes()
    expected = []
    for q in queries:
        best, best_dist = -1, np.inf
        for c in range(NUM_CLASSES):
            if bank.counts[c] == 0:
                continue
            dist = float(np.sum((q - protos[c]) ** 2))
            if dist < best_dist:
                best, best_dist = c, dist
        expected.append(best)
    np.testing.assert_array_equal(bank.predict(queries), expected)


def test_predict_needs_a_known_class():
    with pytest.raises(ValueError, match="at least one class"):
        PrototypeBank.empty(3, 2).predict(np.zeros((1, 2)))


def test_running_mean_update_agrees_with_the_bank():
    embeddings, labels = data(seed=7)
    bank = PrototypeBank.empty(NUM_CLASSES, DIM)
    protos = np.zeros((NUM_CLASSES, DIM))
    counts = [0] * NUM_CLASSES
    for idx in split(len(labels), 8, seed=7):  # missions of varying size
        batch = PrototypeBank.from_embeddings(embeddings[idx], labels[idx], NUM_CLASSES)
        bank = bank.merged(batch)
        for c in np.flatnonzero(batch.counts):
            batch_mean = batch.sums[c] / batch.counts[c]
            protos[c], counts[c] = running_mean_update(
                protos[c], counts[c], batch_mean, int(batch.counts[c])
            )
    known = bank.counts > 0
    np.testing.assert_allclose(protos[known], bank.prototypes()[known], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(counts, bank.counts)


def test_running_mean_update_starts_a_new_class_at_the_batch_mean():
    proto, count = running_mean_update(np.zeros(2), 0, np.array([1.0, 3.0]), 4)
    np.testing.assert_array_equal(proto, [1.0, 3.0])
    assert count == 4


def test_bank_validates_shapes_and_labels():
    with pytest.raises(ValueError, match="counts must have shape"):
        PrototypeBank(np.zeros((3, 2)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="labels must lie"):
        PrototypeBank.from_embeddings(np.zeros((2, 2)), np.array([0, 3]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        PrototypeBank.empty(3, 2).merged(PrototypeBank.empty(4, 2))


def test_running_mean_update_refuses_a_negative_count_of_either_kind() -> None:
    for count, batch_count in [(-1, 2), (2, -1)]:
        with pytest.raises(
            ValueError,
            match=rf"^counts must be non-negative, got count={count}, batch_count={batch_count}$",
        ):
            running_mean_update(np.zeros(2), count, np.ones(2), batch_count)


def test_running_mean_update_of_an_empty_batch_keeps_the_prototype_as_float64() -> None:
    proto, count = running_mean_update(np.array([1.5, 2.5], dtype=np.float32), 3, np.zeros(2), 0)
    assert proto.dtype == np.float64 and proto.tolist() == [1.5, 2.5] and count == 3


def test_running_mean_update_returns_float64_for_any_input_dtype() -> None:
    proto, _ = running_mean_update(np.zeros(2), 0, np.array([1, 3]), 4)  # integer batch mean
    assert proto.dtype == np.float64 and proto.tolist() == [1.0, 3.0]
    wide = np.array([1.0, 2.0], dtype=np.longdouble)
    proto, count = running_mean_update(wide, 1, np.array([4.0, 8.0]), 2)
    assert proto.dtype == np.float64 and proto.tolist() == [3.0, 6.0] and count == 3


def test_running_mean_update_after_a_single_example() -> None:
    proto, count = running_mean_update(np.array([2.0, 2.0]), 1, np.array([5.0, 8.0]), 2)
    np.testing.assert_allclose(proto, [4.0, 6.0], rtol=1e-15)
    assert count == 3


def test_bank_stores_float64_sums_and_int64_counts_whatever_it_is_given() -> None:
    bank = PrototypeBank([[1, 2], [3, 4]], np.array([1, 0], dtype=np.int32))
    assert isinstance(bank.sums, np.ndarray) and bank.sums.dtype == np.float64
    assert bank.counts.dtype == np.int64 and bank.counts.tolist() == [1, 0]


def test_bank_validation_messages() -> None:
    cases = [
        ((np.zeros(3), np.zeros(3, dtype=np.int64)), r"^sums must be \(num_classes, dim\)"),
        ((np.zeros((3, 2)), np.zeros(2, dtype=np.int64)), r"^counts must have shape \(3,\) "),
        ((np.zeros((2, 2)), np.zeros(2)), r"^counts must be integers, got dtype float64$"),
        ((np.zeros((2, 2)), np.array([1, -1])), r"^counts must be non-negative$"),
    ]
    for (sums, counts), message in cases:
        with pytest.raises(ValueError, match=message):
            PrototypeBank(sums, counts)
    labels = np.array([0, 1])
    with pytest.raises(ValueError, match=r"^embeddings must be \(n, dim\), got shape \(2,\)$"):
        PrototypeBank.from_embeddings(np.zeros(2), labels, 3)
    with pytest.raises(ValueError, match=r"^labels must have shape \(3,\), got \(2,\)$"):
        PrototypeBank.from_embeddings(np.zeros((3, 2)), labels, 3)
    with pytest.raises(ValueError, match=r"^labels must be integers, got dtype float64$"):
        PrototypeBank.from_embeddings(np.zeros((2, 2)), labels.astype(float), 3)


def test_a_class_without_examples_has_a_nan_prototype_whatever_its_sums() -> None:
    bank = PrototypeBank(np.array([[1.0, 1.0], [2.0, 4.0]]), np.array([0, 2]))
    protos = bank.prototypes()
    assert np.all(np.isnan(protos[0])) and protos[1].tolist() == [1.0, 2.0]


def test_predict_knows_a_class_from_one_example_and_returns_int64() -> None:
    bank = PrototypeBank.from_embeddings(np.array([[0.0, 0.0], [4.0, 4.0]]), np.array([2, 0]), 3)
    predicted = bank.predict(np.array([[3.0, 3.5], [0.5, -1.0]]))
    assert predicted.dtype == np.int64 and predicted.tolist() == [0, 2]


def test_predict_refuses_embeddings_of_the_wrong_shape() -> None:
    bank = PrototypeBank.from_embeddings(np.ones((2, 2)), np.array([0, 1]), 2)
    for embeddings in (np.zeros((4, 3)), np.zeros(2)):
        shape = re.escape(str(embeddings.shape))
        with pytest.raises(ValueError, match=rf"^embeddings must be \(n, 2\), got shape {shape}$"):
            bank.predict(embeddings)
    with pytest.raises(ValueError, match=r"^predict needs at least one class with a prototype$"):
        PrototypeBank.empty(3, 2).predict(np.zeros((1, 2)))
