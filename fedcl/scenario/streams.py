"""Every client's task stream: which task it starts in which round, packed over all clients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcl.scenario.packed import csr_offsets, group_by_client

# A round that never comes: the deletion round of a sample never deleted, the next start after a
# client's last task, the first task round of a client without one.
NEVER = np.iinfo(np.int64).max


@dataclass(frozen=True)
class TaskStreams:
    """Every client's task stream, packed: client `c` starts task `tasks[i]` in round `rounds[i]`
    for `i` in `offsets[c]:offsets[c + 1]`, in timeline order (so rounds never decrease)."""

    offsets: np.ndarray  # (num_clients + 1,) int64
    rounds: np.ndarray  # int32: rounds and task ids are small, and there are clients × tasks
    tasks: np.ndarray  # int32
    longest: int = 0  # the most entries any one client has

    @classmethod
    def build(
        cls, num_clients: int, clients: list[np.ndarray], rounds: list[int], tasks: list[int]
    ) -> TaskStreams:
        """Streams from task events in timeline order: event `k` starts `tasks[k]` in
        `rounds[k]` for `clients[k]`."""
        owners, order = group_by_client(clients)
        sizes = [len(c) for c in clients]
        counts = np.bincount(owners, minlength=num_clients)
        return cls(
            offsets=csr_offsets(counts),
            rounds=np.repeat(np.asarray(rounds, dtype=np.int32), sizes)[order],
            tasks=np.repeat(np.asarray(tasks, dtype=np.int32), sizes)[order],
            longest=int(counts.max(initial=0)),
        )

    def position(self, client: int, server_round: int) -> int:
        """Index of the entry client `client` follows in `server_round`; -1 before its first."""
        start, stop = self.offsets[client], self.offsets[client + 1]
        found = np.searchsorted(self.rounds[start:stop], server_round, side="right")
        return int(start + found - 1) if found else -1

    def positions(self, clients: np.ndarray, server_round: int) -> np.ndarray:
        """`position` of each of `clients`: one array pass per entry of the longest stream."""
        starts, stops = self.offsets[clients], self.offsets[clients + 1]
        found = np.full(len(clients), -1, dtype=np.int64)
        for step in range(self.longest):
            at = starts + step
            reached = at < stops
            reached[reached] = self.rounds[at[reached]] <= server_round
            found[reached] = at[reached]
        return found

    def owners(self) -> np.ndarray:
        """The client of every entry."""
        return np.repeat(np.arange(len(self.offsets) - 1), np.diff(self.offsets))

    def next_rounds(self) -> np.ndarray:
        """For every entry, the round of its client's next entry (`NEVER` after the last)."""
        following = np.full(len(self.rounds), NEVER, dtype=np.int64)
        following[:-1] = self.rounds[1:]
        ends = self.offsets[1:][np.diff(self.offsets) > 0] - 1
        following[ends] = NEVER
        return following

    def first_rounds(self) -> np.ndarray:
        """Each client's first task round (`NEVER` for a client without a task)."""
        first = np.full(len(self.offsets) - 1, NEVER, dtype=np.int64)
        has = np.diff(self.offsets) > 0
        first[has] = self.rounds[self.offsets[:-1][has]]
        return first
