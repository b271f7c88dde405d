"""The scenario built from a config: tasks, client shares, rounds, permuted inputs."""

from __future__ import annotations

import numpy as np
import pytest

from fedcl.config import load_config
from fedcl.errors import ConfigError
from fedcl.scenario.builder import build_scenario
from fedcl.scenario.datasets import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_each_task_is_split_exactly_over_the_clients(digits, partition):
    cfg = load_config(None, ["clients.num=7", f"clients.partition={partition}", "rounds=10"])
    scenario = build_scenario(cfg, digits)
    for task, classes in enumerate(scenario.task_classes):
        held = np.concatenate([scenario.train_indices(c, task) for c in range(7)])
        expected = np.flatnonzero(np.isin(digits.y_train, classes))
        assert np.array_equal(np.sort(held), expected)  # every sample once, no other
        test = scenario.test_indices[task]
        assert set(digits.y_test[test]) == set(classes.tolist())


def test_tasks_are_placed_on_rounds(digits):
    cfg = load_config(None, ["rounds=11", "scenario.num_tasks=3"])
    scenario = build_scenario(cfg, digits)
    tasks = [scenario.global_task(r) for r in range(1, 12)]
    assert tasks == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]  # the last task takes the remainder
    assert scenario.task_end_rounds() == [3, 6, 11]


def test_permuted_tasks_permute_inputs_consistently(digits):
    cfg = load_config(None, ["scenario.kind=permuted", "scenario.num_tasks=3", "rounds=6"])
    scenario = build_scenario(cfg, digits)
    x = digits.x_test[:5]
    assert np.array_equal(scenario.task_inputs(x, 0), x)  # task 0 is the plain input
    for task in (1, 2):
        moved = scenario.task_inputs(x, task)
        assert moved.shape == x.shape and not np.array_equal(moved, x)
        assert np.array_equal(np.sort(moved.reshape(5, -1)), np.sort(x.reshape(5, -1)))
    assert all(len(c) == 10 for c in scenario.task_classes)


def test_unknown_scenario_kind_is_refused(digits):
    cfg = load_config(None, ["scenario.kind=mystery"])
    with pytest.raises(ConfigError, match="unknown scenario.kind 'mystery'; valid: "):
        build_scenario(cfg, digits)
