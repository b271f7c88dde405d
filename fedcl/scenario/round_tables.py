"""The driver's per-round questions (the global task, the tasks seen, the available clients, whose
task ends) answered from tables built once, so a round costs the same whether a thousand or a
million clients are registered."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from fedcl.scenario.concepts import ClientDrifts
from fedcl.scenario.streams import NEVER, TaskStreams


class RoundTables:
    """What the driver asks of a scenario every round, tabulated once over round numbers.

    Built from the streams and the join/leave rounds in a few vectorized passes over the stream
    entries; afterwards the global task, the tasks seen, the available count and the task ends
    of a round are read from arrays indexed by the round (rows 0 .. rounds + 1; later rounds read
    the last row). Only the ids of the available clients are computed per client, and only when
    the available set changes: it can change only in rounds where some client joins, leaves or
    starts its first task.
    """

    def __init__(
        self,
        streams: TaskStreams,
        drifts: ClientDrifts,
        join_round: np.ndarray,
        leave_round: np.ndarray,
        rounds: int,
        num_tasks: int,
    ) -> None:
        owners = streams.owners()
        starts = streams.rounds.astype(np.int64)
        following = streams.next_rounds()
        self.rounds = rounds
        self.drifts = drifts
        self._count_tasks(
            owners, starts, following, streams.tasks, join_round, leave_round, num_tasks
        )
        self.first_start = np.full(num_tasks, NEVER, dtype=np.int64)
        np.minimum.at(self.first_start, streams.tasks, starts)
        self._index_task_ends(owners, starts, following, streams.tasks, leave_round)
        self._index_availability(np.maximum(join_round, streams.first_rounds()), leave_round)

    def _count_tasks(
        self,
        owners: np.ndarray,
        starts: np.ndarray,
        following: np.ndarray,
        tasks: np.ndarray,
        join_round: np.ndarray,
        leave_round: np.ndarray,
        num_tasks: int,
    ) -> None:
        # Per round and task: how many available clients train it, and how many clients do.
        rows = self.rounds + 2
        self.available_tasks = _interval_counts(
            np.maximum(starts, join_round[owners]),
            np.minimum(following, leave_round[owners]),
            tasks,
            rows,
            num_tasks,
        )
        self.current_tasks = _interval_counts(starts, following, tasks, rows, num_tasks)
        self.available_counts = self.available_tasks.sum(axis=1)

    def _index_availability(self, start: np.ndarray, stop: np.ndarray) -> None:
        # A client is available from `start` (joined, with a task) until `stop` (it leaves).
        self.start, self.stop = start, np.asarray(stop, dtype=np.int64)
        changes = np.zeros(self.rounds + 2, dtype=bool)
        for bound in (self.start, self.stop):
            changes[bound[bound <= self.rounds + 1]] = True
        self.epoch = np.cumsum(changes)
        self._available: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    def _index_task_ends(
        self,
        owners: np.ndarray,
        starts: np.ndarray,
        following: np.ndarray,
        tasks: np.ndarray,
        leave_round: np.ndarray,
    ) -> None:
        # An entry's task ends in the round before the client's next entry, before it leaves,
        # or in the run's last round, whichever comes first, if it is ever trained at all.
        ends = np.minimum(np.minimum(following - 1, leave_round[owners] - 1), self.rounds)
        trains = ends >= starts
        order = np.argsort(ends[trains], kind="stable")  # stable: clients ascending in a round
        self.end_clients = owners[trains][order]
        self.end_tasks = tasks[trains][order]
        self.end_offsets = np.searchsorted(ends[trains][order], np.arange(self.rounds + 2))

    def task_ends(self, server_round: int) -> tuple[np.ndarray, np.ndarray]:
        """(clients, their tasks) whose task ends with `server_round`, clients ascending."""
        if not 1 <= server_round <= self.rounds:
            return self.end_clients[:0], self.end_tasks[:0]
        start, stop = self.end_offsets[server_round], self.end_offsets[server_round + 1]
        return self.end_clients[start:stop], self.end_tasks[start:stop]

    @cached_property
    def drift_signatures(self) -> np.ndarray:
        """Per drifted client (a row of `ClientDrifts`), an id shared by those under equal spans."""
        return self.drifts.signatures()

    def row(self, server_round: int) -> int:
        """The table row of `server_round`."""
        return min(max(server_round, 0), self.rounds + 1)

    def available_ids(self, server_round: int) -> np.ndarray:
        """Ids of the clients available in `server_round` (read-only, shared while the available
        set does not change)."""
        if not 1 <= server_round <= self.rounds:
            return np.zeros(0, dtype=np.int64)
        epoch = int(self.epoch[server_round])
        if self._available[0] != epoch:
            ids = np.flatnonzero((self.start <= server_round) & (server_round < self.stop))
            ids.flags.writeable = False
            self._available = (epoch, ids)
        return self._available[1]


def _interval_counts(
    lo: np.ndarray, hi: np.ndarray, tasks: np.ndarray, num_rows: int, num_tasks: int
) -> np.ndarray:
    """(num_rows, num_tasks) table: in row r, how many entries hold task t with lo <= r < hi."""
    lo, hi = np.clip(lo, 0, num_rows), np.clip(hi, 0, num_rows)
    keep = lo < hi
    width = (num_rows + 1) * num_tasks
    tasks = tasks[keep].astype(np.int64)
    steps = np.bincount(lo[keep] * num_tasks + tasks, minlength=width) - np.bincount(
        hi[keep] * num_tasks + tasks, minlength=width
    )
    return np.cumsum(steps.reshape(num_rows + 1, num_tasks), axis=0)[:num_rows]
