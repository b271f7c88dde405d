"""Client partitions: exact cover, determinism, and the label skew each scheme promises."""

from __future__ import annotations

import numpy as np
import pytest

from fedcl.errors import ConfigError
from fedcl.scenario.partition import PARTITIONS, partition_indices, partition_packed


def _labels(seed: int, n: int = 600, num_classes: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n)


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=num_classes) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


@pytest.mark.parametrize("scheme", PARTITIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_clients", [1, 7, 30])
def test_every_sample_goes_to_exactly_one_client(scheme: str, seed: int, num_clients: int) -> None:
    labels = _labels(seed)
    parts = partition_indices(labels, num_clients, scheme, np.random.default_rng(seed))
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
        assert len(part) >= 1  # the default min_per_client
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_same_rng_seed_gives_same_partition(scheme: str) -> None:
    labels = _labels(3)
    first = partition_indices(labels, 12, scheme, np.random.default_rng(5), alpha=0.3)
    again = partition_indices(labels, 12, scheme, np.random.default_rng(5), alpha=0.3)
    other = partition_indices(labels, 12, scheme, np.random.default_rng(6), alpha=0.3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    parts = partition_indices(_labels(0, n=103), 10, "iid", np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_dirichlet_alpha_is_much_more_label_skewed_than_large(seed: int) -> None:
    labels = _labels(seed, n=2000)

    def entropy(alpha: float) -> float:
        parts = partition_indices(labels, 20, "dirichlet", np.random.default_rng(seed), alpha=alpha)
        return _mean_label_entropy(labels, parts, 10)

    skewed, uniform = entropy(0.05), entropy(100.0)
    assert uniform > 0.9 * np.log(10)  # near-uniform label mix per client
    assert skewed < 0.5 * uniform


def test_dirichlet_meets_min_per_client_even_when_redraws_cannot() -> None:
    # alpha this small almost always leaves clients empty, so the fix-up must do the work.
    labels = _labels(0, n=500)
    parts = partition_indices(
        labels, 50, "dirichlet", np.random.default_rng(0), alpha=0.001, min_per_client=10
    )
    assert min(len(p) for p in parts) == 10
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(500))


def test_min_per_client_zero_allows_empty_clients() -> None:
    parts = partition_indices(
        _labels(0, n=50), 40, "dirichlet", np.random.default_rng(0), alpha=0.01, min_per_client=0
    )
    assert sum(len(p) for p in parts) == 50
    assert any(len(p) == 0 for p in parts)


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_too_few_samples_for_min_per_client_raises(scheme: str) -> None:
    with pytest.raises(ConfigError, match="at least 3 samples"):
        partition_indices(_labels(0, n=29), 10, scheme, np.random.default_rng(0), min_per_client=3)


def test_shards_aligned_with_classes_give_each_client_at_most_its_shard_count_of_labels() -> None:
    # 10 classes of 100 samples, 50 shards of 20: every shard holds one label.
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100))
    parts = partition_indices(labels, 25, "shards", np.random.default_rng(1), shards_per_client=2)
    assert all(len(p) == 40 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    # and the draw is not degenerate: many clients see two different labels
    assert sum(len(np.unique(labels[p])) == 2 for p in parts) > 10


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shards_per_client", [1, 2, 3])
def test_shards_bound_label_spread_for_any_labels(seed: int, shards_per_client: int) -> None:
    # Each shard is a contiguous run of label-sorted samples, so it spans one label plus one more
    # per class boundary inside it: at most num_shards + num_classes - 1 (client, label) pairs.
    labels = _labels(seed, n=997, num_classes=7)
    num_clients = 13
    parts = partition_indices(
        labels,
        num_clients,
        "shards",
        np.random.default_rng(seed),
        shards_per_client=shards_per_client,
    )
    pairs = sum(len(np.unique(labels[p])) for p in parts)
    assert pairs <= num_clients * shards_per_client + 7 - 1


def test_unknown_scheme_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="iid, dirichlet, shards"):
        partition_indices(_labels(0), 3, "pathological", np.random.default_rng(0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_clients": 0},
        {"num_clients": 2.5},
        {"alpha": 0.0},
        {"alpha": float("nan")},
        {"scheme": "shards", "shards_per_client": 0},
        {"min_per_client": -1},
    ],
)
def test_bad_option_values_raise_config_error(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"num_clients": 4, "scheme": "dirichlet", **kwargs}
    with pytest.raises(ConfigError):
        partition_indices(_labels(0), rng=np.random.default_rng(0), **args)  # type: ignore[arg-type]


def test_the_defaults_are_alpha_half_two_shards_and_one_sample_per_client() -> None:
    labels = _labels(3, n=200)
    for scheme in PARTITIONS:
        default = partition_indices(labels, 7, scheme, np.random.default_rng(4))
        explicit = partition_indices(
            labels,
            7,
            scheme,
            np.random.default_rng(4),
            alpha=0.5,
            shards_per_client=2,
            min_per_client=1,
        )
        for got, expected in zip(default, explicit, strict=True):
            np.testing.assert_array_equal(got, expected)
        packed = partition_packed(labels, 7, scheme, np.random.default_rng(4))
        np.testing.assert_array_equal(packed[0], np.concatenate(explicit))
    # 4 samples among 3 clients (packed): one each is the default minimum, two would not fit.
    _, offsets = partition_packed(np.arange(4), 3, "iid", np.random.default_rng(0))
    assert np.diff(offsets).tolist() == [2, 1, 1]
    # 4 samples among 3 clients: one sample each is the default minimum, two would not fit.
    parts = partition_indices(np.arange(4), 3, "iid", np.random.default_rng(0))
    assert sorted(len(p) for p in parts) == [1, 1, 2]


def test_a_fix_up_tops_short_clients_up_to_exactly_the_minimum() -> None:
    labels = np.repeat(np.arange(3), 10)  # 30 samples: exactly 5 clients x 6
    parts = partition_indices(
        labels, 5, "dirichlet", np.random.default_rng(1), alpha=0.001, min_per_client=6
    )
    assert [len(p) for p in parts] == [6] * 5
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(30))


def test_no_samples_give_empty_int64_clients() -> None:
    for scheme in PARTITIONS:
        for labels in (np.zeros(0, dtype=np.int64), np.zeros(0)):  # empty labels of any dtype
            parts = partition_indices(labels, 3, scheme, np.random.default_rng(0), min_per_client=0)
            assert [p.dtype for p in parts] == [np.dtype(np.int64)] * 3
            assert [len(p) for p in parts] == [0, 0, 0]


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (np.zeros((4, 2), dtype=np.int64), {}, r"1-d integer array, got int64 of shape \(4, 2\)$"),
        (np.array([0.0, 1.0, 1.0]), {}, r"1-d integer array, got float64 of shape \(3,\)$"),
        (np.array([1.0]), {"num_clients": 1}, r"1-d integer array, got float64 of shape \(1,\)$"),
        (None, {"num_clients": 0}, r"^partition num_clients must be an integer >= 1, got 0$"),
        (
            None,
            {"min_per_client": -1},
            r"^partition min_per_client must be an integer >= 0, got -1$",
        ),
        (
            None,
            {"scheme": "shards", "shards_per_client": 0},
            r"^partition shards_per_client must be an integer >= 1, got 0$",
        ),
        (
            None,
            {"alpha": float("inf")},
            r"^partition alpha must be a positive finite number, got inf$",
        ),
    ],
)
def test_bad_arguments_are_named_in_the_error(
    labels: np.ndarray | None, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"num_clients": 2, "scheme": "dirichlet", **kwargs}
    labels = _labels(0, n=20) if labels is None else labels
    with pytest.raises(ConfigError, match=message):
        partition_indices(labels, rng=np.random.default_rng(0), **args)  # type: ignore[arg-type]
