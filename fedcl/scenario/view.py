"""A client's view of its data: which samples it holds in a round, and how they look to it (each
task's domain transform, then the drifts of its concept). Views are derived from the shared
arrays on demand; the scenario never holds a copy of the data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcl.scenario.concepts import Concept
from fedcl.seeding import derive_rng

if TYPE_CHECKING:
    from fedcl.scenario.scenario import Scenario


@dataclass(frozen=True)
class ClientView:
    """What a client trains on in one round: sample ids, inputs, labels, and each sample's task."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    tasks: np.ndarray


def client_ids(
    scenario: Scenario, client: int, server_round: int, task: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(training sample ids, their tasks) client `client` holds in `server_round`, deletions
    removed.

    With `task` None: the data of the task it trains in the round (none before its first task),
    and after a task switch a blurry share of the previous task's data mixed in. With a `task`:
    its data of that task alone.
    """
    blurry = task is None
    if task is None:
        task = scenario.task_of(client, server_round)
        if task < 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ids = scenario.train_indices(client, task)
    tasks = np.full(len(ids), task, dtype=np.int64)
    if blurry:
        ids, tasks = _mix_in_previous(scenario, client, server_round, ids, tasks)
    keep = ~scenario.deleted(ids, server_round)
    return ids[keep], tasks[keep]


def _mix_in_previous(
    scenario: Scenario, client: int, server_round: int, ids: np.ndarray, tasks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`ids` and `tasks` with the blurry share of the previous task's data appended, in the
    first `blurry_rounds` rounds of a task that follows another."""
    previous, start = scenario.previous_task(client, server_round)
    in_window = server_round < start + scenario.blurry_rounds
    if not (scenario.blurry_share > 0 and previous >= 0 and in_window):
        return ids, tasks
    old = scenario.train_indices(client, previous)
    rng = derive_rng(scenario.seed, "blurry", client, start)
    count = min(len(old), int(round(scenario.blurry_share * len(ids))))
    mixed = np.sort(rng.choice(old, count, replace=False))
    return (
        np.concatenate([ids, mixed]),
        np.concatenate([tasks, np.full(count, previous, dtype=np.int64)]),
    )


def client_view(
    scenario: Scenario,
    x_all: np.ndarray,
    y_all: np.ndarray,
    ids: np.ndarray,
    tasks: np.ndarray,
    concept: Concept,
    split: str = "train",
) -> ClientView:
    """Samples `ids` of `x_all`, `y_all` (of tasks `tasks`, one per id) as a client under
    `concept` sees them: each task's domain transform, then each drift at its severity (which
    may drop rows). `split` names the arrays ("train" or "test"): drifts draw for each split
    apart. The shared arrays are never modified."""
    x, y = x_all[ids], y_all[ids]
    for task in np.unique(tasks):
        rows = tasks == task
        if scenario.input_transforms and scenario.input_transforms[task] is not None:
            x[rows] = task_inputs(scenario.input_transforms, x[rows], int(task))
    for span, severity in concept:
        x, y, keep = span.drift.apply(x, y, ids, severity, split=split)
        x, y, ids, tasks = x[keep], y[keep], ids[keep], tasks[keep]
    return ClientView(ids, x, y, tasks)


def task_inputs(
    transforms: tuple[dict[str, Any] | None, ...], x: np.ndarray, task: int
) -> np.ndarray:
    """`x` as task `task` presents it under the per-task domain `transforms` (unchanged, not
    copied, for a task without one)."""
    transform = transforms[task] if transforms else None
    if transform is None:
        return x
    if transform["kind"] == "permutation":
        return x.reshape(len(x), -1)[:, transform["permutation"]].reshape(x.shape)
    from scipy.ndimage import rotate  # imported here: only rotated-domain runs need scipy

    return rotate(x, transform["degrees"], axes=(-2, -1), reshape=False, order=1)


def class_mask(scenario: Scenario, tasks: np.ndarray, num_classes: int) -> np.ndarray | None:
    """Task-incremental only: (n, num_classes) bool, True for the classes of each row's task;
    None otherwise (one head over all classes)."""
    if not scenario.task_incremental:
        return None
    mask = np.zeros((len(tasks), num_classes), dtype=bool)
    for task in np.unique(tasks):
        mask[np.ix_(tasks == task, scenario.task_classes[task])] = True
    return mask
