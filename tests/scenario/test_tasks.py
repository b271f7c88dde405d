"""Class-incremental task splits and task sample masks."""

from __future__ import annotations

import numpy as np
import pytest

from fedcl.errors import ConfigError
from fedcl.scenario.tasks import class_incremental_split, task_sample_mask


@pytest.mark.parametrize(
    ("num_classes", "num_tasks"), [(10, 1), (10, 5), (10, 3), (7, 7), (100, 6)]
)
def test_every_class_lands_in_exactly_one_nonempty_task(num_classes: int, num_tasks: int) -> None:
    tasks = class_incremental_split(num_classes, num_tasks)
    assert len(tasks) == num_tasks
    assert all(t.dtype == np.int64 and len(t) >= 1 for t in tasks)
    np.testing.assert_array_equal(np.sort(np.concatenate(tasks)), np.arange(num_classes))
    sizes = [len(t) for t in tasks]
    assert max(sizes) - min(sizes) <= 1


def test_default_order_is_contiguous_range() -> None:
    tasks = class_incremental_split(10, 3)
    assert [t.tolist() for t in tasks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_class_order_is_followed() -> None:
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    tasks = class_incremental_split(10, 5, class_order=order)
    assert [t.tolist() for t in tasks] == [[3, 1], [4, 0], [5, 9], [2, 6], [8, 7]]


def test_rng_permutes_classes_deterministically() -> None:
    first = class_incremental_split(20, 4, rng=np.random.default_rng(7))
    again = class_incremental_split(20, 4, rng=np.random.default_rng(7))
    assert [t.tolist() for t in first] == [t.tolist() for t in again]
    assert np.concatenate(first).tolist() != list(range(20))
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.arange(20))


def test_class_order_wins_over_rng() -> None:
    tasks = class_incremental_split(4, 2, class_order=[3, 2, 1, 0], rng=np.random.default_rng(0))
    assert [t.tolist() for t in tasks] == [[3, 2], [1, 0]]


@pytest.mark.parametrize("num_tasks", [0, -1, 11, 2.0, True])
def test_num_tasks_out_of_range_raises(num_tasks: object) -> None:
    with pytest.raises(ConfigError, match="num_tasks"):
        class_incremental_split(10, num_tasks)  # type: ignore[arg-type]


@pytest.mark.parametrize("order", [[0, 1, 2], [0, 1, 2, 2], [1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0]])
def test_class_order_that_is_not_a_permutation_raises(order: list[float]) -> None:
    with pytest.raises(ConfigError, match="class_order"):
        class_incremental_split(4, 2, class_order=order)  # type: ignore[arg-type]


def test_task_sample_mask_selects_exactly_the_task_labels() -> None:
    labels = np.array([0, 5, 3, 5, 9, 1, 3])
    mask = task_sample_mask(labels, np.array([3, 5]))
    assert mask.dtype == np.bool_
    assert mask.tolist() == [False, True, True, True, False, False, True]


def test_task_masks_partition_the_samples() -> None:
    labels = np.random.default_rng(0).integers(0, 10, 500)
    masks = [task_sample_mask(labels, t) for t in class_incremental_split(10, 3)]
    np.testing.assert_array_equal(np.sum(masks, axis=0), np.ones(500))
