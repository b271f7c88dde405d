"""The scenario in which some delete events' data never existed (the oracle's, and a replay's)."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import numpy as np

from fedcl.scenario.scenario import Scenario


def deleted_by(scenario: Scenario, event_indices: Collection[int]) -> np.ndarray:
    """The training sample ids (ascending, distinct) the delete events `event_indices` remove."""
    parts = [np.zeros(0, dtype=np.int64)]
    for index in event_indices:
        parts.extend(scenario.deleted_by_event.get(index, {}).values())
    return np.unique(np.concatenate(parts).astype(np.int64))


def without_data(scenario: Scenario, event_indices: Collection[int]) -> Scenario:
    """`scenario` with the data of the delete events `event_indices` absent from round 1 on, and
    those events left out of the timeline (no hook is told to remove what was never there).

    Everything else is unchanged (availability, leaves, tasks, drift, every seed), so each draw
    of a run on it equals the original run's: a forgotten client stays registered, holding no
    data, until the round it leaves. Rounds in which the deleted data was never trained on play
    the same on both scenarios, which is what makes a rollback-and-replay exact.
    """
    indices = set(event_indices)
    rounds = scenario.deletion_round.copy()
    rounds[deleted_by(scenario, indices)] = 0
    return dataclasses.replace(
        scenario,
        deletion_round=rounds,
        timeline=tuple(
            e for e in scenario.timeline if not (e.kind == "delete" and e.index in indices)
        ),
        deleted_by_event={k: v for k, v in scenario.deleted_by_event.items() if k not in indices},
    )


def sample_tasks(scenario: Scenario, client: int, ids: np.ndarray) -> np.ndarray:
    """The task of each of client `client`'s sample `ids` (-1 for an id it does not hold)."""
    tasks = np.full(len(ids), -1, dtype=np.int64)
    for task in range(scenario.num_tasks):
        tasks[np.isin(ids, scenario.train.get(client, task))] = task
    return tasks


def forget_sets(
    scenario: Scenario, event_indices: Collection[int], server_round: int
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per client, the (ids, tasks) the delete events `event_indices` removed from it, of the
    tasks seen by `server_round` (data of later tasks was never trained on by anyone)."""
    seen = scenario.seen_tasks(server_round)
    found: dict[int, list[np.ndarray]] = {}
    for index in sorted(event_indices):
        for client, ids in scenario.deleted_by_event.get(index, {}).items():
            found.setdefault(client, []).append(ids)
    result = {}
    for client in sorted(found):
        ids = np.unique(np.concatenate(found[client]))
        tasks = sample_tasks(scenario, client, ids)
        keep = np.isin(tasks, seen)
        if keep.any():
            result[client] = (ids[keep], tasks[keep])
    return result
