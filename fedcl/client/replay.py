"""Client-side experience replay: a bounded buffer of past samples per client, reservoir-sampled.

The buffer holds sample ids and their tasks (never data), lives in the node's `Context.state` on
its actor, and is purged of deleted samples before each use, so deleted data is never replayed.
Each task's samples are offered to the reservoir once, the first round the client trains on it,
so every sample of the stream has the same chance to be kept (Vitter's Algorithm R).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

BUFFER_KEY = "fedcl.replay"  # ArrayRecord: ids, tasks
STATS_KEY = "fedcl.replay-stats"  # ConfigRecord: seen (samples offered so far), offered (tasks)


def replay_samples(context: Context) -> tuple[np.ndarray, np.ndarray]:
    """(ids, tasks) currently in the client's buffer (empty arrays when there is none)."""
    if BUFFER_KEY not in context.state:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    record = context.state[BUFFER_KEY]
    return record["ids"].numpy(), record["tasks"].numpy()


def _store(context: Context, ids: np.ndarray, tasks: np.ndarray) -> None:
    context.state[BUFFER_KEY] = ArrayRecord(
        {"ids": Array(ids.astype(np.int64)), "tasks": Array(tasks.astype(np.int64))}
    )


def purge(context: Context, deleted: np.ndarray) -> int:
    """Drop the buffered samples whose `deleted` mask (over the buffer) is True; return how many."""
    ids, tasks = replay_samples(context)
    if deleted.any():
        _store(context, ids[~deleted], tasks[~deleted])
    return int(deleted.sum())


def offer(
    context: Context,
    ids: np.ndarray,
    task: int,
    capacity: int,
    rng: np.random.Generator,
) -> None:
    """Offer task `task`'s samples `ids` to the reservoir, once per task (later calls for the same
    task do nothing); afterwards the buffer is a uniform sample of everything offered."""
    if STATS_KEY not in context.state:
        context.state[STATS_KEY] = ConfigRecord({"seen": 0, "offered": []})
    stats = context.state[STATS_KEY]
    offered = list(stats["offered"])
    if task in offered:
        return
    buffer_ids, buffer_tasks = replay_samples(context)
    buffer_ids, buffer_tasks = list(buffer_ids), list(buffer_tasks)
    seen = int(stats["seen"])
    for sample in ids:
        seen += 1
        if len(buffer_ids) < capacity:
            buffer_ids.append(int(sample))
            buffer_tasks.append(task)
        else:
            slot = int(rng.integers(0, seen))
            if slot < capacity:
                buffer_ids[slot], buffer_tasks[slot] = int(sample), task
    _store(context, np.asarray(buffer_ids), np.asarray(buffer_tasks))
    stats["seen"] = seen
    stats["offered"] = [*offered, task]
