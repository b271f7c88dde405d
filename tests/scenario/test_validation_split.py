"""The validation split (`dataset.validation`): stratified by class, disjoint from every client's
training data, deterministic per seed and task."""

from __future__ import annotations

import numpy as np
import pytest

from fedcl.config import load_config
from fedcl.errors import ConfigError
from fedcl.scenario.builder import build_scenario
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.validation import stratified_holdout
from fedcl.seeding import derive_rng


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _scenario(digits, *overrides: str):
    base = ["rounds=6", "scenario.num_tasks=3", "clients.num=4", "clients.partition=iid"]
    return build_scenario(load_config(None, [*base, *overrides]), digits)


def test_holdout_takes_the_fraction_of_every_class():
    labels = np.repeat([0, 1, 2], [100, 40, 11])
    held = stratified_holdout(labels, 0.1, np.random.default_rng(0))
    assert [int(held[labels == c].sum()) for c in (0, 1, 2)] == [10, 4, 1]


def test_holdout_edge_cases():
    rng = np.random.default_rng(0)
    assert not stratified_holdout(np.zeros(10, int), 0.0, rng).any()
    # A lone sample stays for training; a tiny fraction still holds out one of a pair.
    assert not stratified_holdout(np.array([3]), 0.5, rng).any()
    assert stratified_holdout(np.array([1, 1]), 0.01, rng).sum() == 1
    # A large fraction never takes a whole class.
    assert stratified_holdout(np.array([2, 2, 2]), 0.99, rng).sum() == 2
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        stratified_holdout(np.zeros(3, int), 1.0, rng)


def test_holdout_is_the_same_for_the_same_generator_state():
    labels = np.arange(200) % 7
    first = stratified_holdout(labels, 0.25, derive_rng(3, "validation", 1))
    again = stratified_holdout(labels, 0.25, derive_rng(3, "validation", 1))
    other = stratified_holdout(labels, 0.25, derive_rng(4, "validation", 1))
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_scenario_holds_out_a_stratified_share_no_client_ever_holds(digits):
    scenario = _scenario(digits, "dataset.validation=0.2")
    for task, classes in enumerate(scenario.task_classes):
        held = scenario.validation_indices[task]
        clients = np.concatenate([scenario.train_indices(c, task) for c in range(4)])
        assert not np.isin(held, clients).any()
        # Held-out plus client data is the whole task: nothing lost, nothing duplicated.
        task_ids = np.flatnonzero(np.isin(digits.y_train, classes))
        np.testing.assert_array_equal(np.sort(np.concatenate([held, clients])), task_ids)
        for c in classes:
            count = int((digits.y_train[task_ids] == c).sum())
            assert int((digits.y_train[held] == c).sum()) == round(0.2 * count)
    # No client sees a held-out sample in any round, through the view it trains on.
    held_all = np.concatenate(scenario.validation_indices)
    for client in range(4):
        for server_round in range(1, 7):
            ids, _ = scenario.client_ids(client, server_round)
            assert not np.isin(ids, held_all).any()


def test_split_is_deterministic_per_seed_and_differs_across_seeds(digits):
    first = _scenario(digits, "dataset.validation=0.1", "seed=5").validation_indices
    again = _scenario(digits, "dataset.validation=0.1", "seed=5").validation_indices
    other = _scenario(digits, "dataset.validation=0.1", "seed=6").validation_indices
    for a, b, c in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_no_validation_by_default_and_the_test_set_is_untouched(digits):
    plain = _scenario(digits)
    split = _scenario(digits, "dataset.validation=0.3")
    assert all(len(ids) == 0 for ids in plain.validation_indices)
    for a, b in zip(plain.test_indices, split.test_indices, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_bad_fraction_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"dataset.validation must be in \[0, 1\)"):
        load_config(None, [f"dataset.validation={value}"])
