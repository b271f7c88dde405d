"""Per-client data packed CSR-style: one flat array of entries, client after client, and the
offsets where each client's entries start. A client costs a few bytes, never a Python object, so
a scenario holds millions of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClientTaskIndex:
    """Per task, every client's training sample positions, packed CSR-style (bytes per client)."""

    indices: tuple[np.ndarray, ...]  # per task: all clients' positions, client after client
    offsets: tuple[np.ndarray, ...]  # per task: (num_clients + 1,) boundaries into `indices`

    def get(self, client: int, task: int) -> np.ndarray:
        """Return the positions (into the training arrays) client `client` holds for task `task`."""
        start, stop = self.offsets[task][client], self.offsets[task][client + 1]
        return self.indices[task][start:stop]

    def held(self, client: int) -> np.ndarray:
        """Every position client `client` holds, over all tasks (task after task)."""
        return np.concatenate([self.get(client, t) for t in range(len(self.indices))])


def group_by_client(clients: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The clients of events listed one after another, sorted, and the (stable) sorting order:
    each client's entries keep the events' order."""
    owners = np.concatenate(clients) if clients else np.zeros(0, dtype=np.int64)
    order = np.argsort(owners, kind="stable")
    return owners[order], order


def csr_offsets(counts: np.ndarray) -> np.ndarray:
    """(len(counts) + 1,) int64 boundaries of consecutive runs of `counts` entries."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
