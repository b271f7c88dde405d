"""Class-incremental task streams: which classes each task holds, and which samples belong to it."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import numpy as np

from fedcl.errors import ConfigError

__all__ = ["class_incremental_split", "task_sample_mask"]


def class_incremental_split(
    num_classes: int,
    num_tasks: int,
    *,
    class_order: Sequence[int] | None = None,
    rng: np.random.Generator | None = None,
) -> list[np.ndarray]:
    """Split classes ``0 .. num_classes - 1`` into `num_tasks` disjoint tasks.

    The classes are taken in `class_order` if given, else in a permutation drawn from `rng` if
    given, else in increasing order, and cut into `num_tasks` contiguous groups whose sizes differ
    by at most one (larger groups first, as `np.array_split`). Every class appears in exactly one
    task and every task has at least one class. Returns one int64 array of classes per task.

    Raises `ConfigError` when `num_tasks` is not in ``1 .. num_classes`` or `class_order` is not a
    permutation of ``range(num_classes)``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if (
        isinstance(num_tasks, bool)
        or not isinstance(num_tasks, Integral)
        or not 1 <= num_tasks <= num_classes
    ):
        raise ConfigError(
            f"num_tasks must be an integer from 1 to num_classes={num_classes}, got {num_tasks!r}"
        )
    if class_order is not None:
        order = np.asarray(class_order)
        is_permutation = (
            order.ndim == 1
            and np.issubdtype(order.dtype, np.integer)
            and np.array_equal(np.sort(order), np.arange(num_classes))
        )
        if not is_permutation:
            raise ConfigError(
                f"class_order must list each class 0..{num_classes - 1} exactly once, "
                f"got {list(np.ravel(order))}"
            )
    elif rng is not None:
        order = rng.permutation(num_classes)
    else:
        order = np.arange(num_classes)
    return [group.astype(np.int64) for group in np.array_split(order, num_tasks)]


def task_sample_mask(labels: np.ndarray, task_classes: np.ndarray) -> np.ndarray:
    """A boolean mask, shaped like `labels`, true where the label is one of `task_classes`."""
    return np.isin(np.asarray(labels), np.asarray(task_classes))
