"""Data deletion: which training samples a delete event removes, and the round from which each
sample is gone.

A sample is deleted once: an event that asks again for a sample an earlier event removed neither
counts it nor moves its deletion round. What each event newly removed is written to the run folder
(`deletions/event_XXXXX.npz`, see `deletion_arrays`), so the deletion audit can be recomputed from
the folder alone (`fedcl.engine.audit.recompute_audit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedcl.errors import ConfigError
from fedcl.scenario.events import Event
from fedcl.scenario.packed import ClientTaskIndex
from fedcl.scenario.streams import NEVER
from fedcl.seeding import derive_rng

DELETIONS_FOLDER = "deletions"


@dataclass
class Deletions:
    """The deletions of a timeline, gathered event by event in timeline order."""

    rounds: np.ndarray  # per training sample (int64): the round it is deleted in, NEVER if never
    # Per delete event (by timeline index): per client that lost any, the ids it newly removed.
    by_event: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def none(cls, num_samples: int) -> Deletions:
        """No sample deleted."""
        return cls(np.full(num_samples, NEVER, dtype=np.int64))

    def record(self, event: Event, per_client: dict[int, np.ndarray]) -> None:
        """Delete `per_client`'s samples from the event's round. Events come in timeline (round)
        order; ids an earlier event deleted are left out of `by_event` and keep their round.

        A sample two clients hold (the same position in two tasks of a domain-incremental
        scenario) is recorded under both when this event removes it from both.
        """
        fresh = {}
        for client, ids in per_client.items():
            # Compared with the state before the event, so a shared sample stays with both.
            new = ids[self.rounds[ids] == NEVER]
            if len(new):
                fresh[client] = new
        for ids in fresh.values():
            self.rounds[ids] = event.round
        self.by_event[event.index] = fresh


def deleted_ids(
    event: Event, train: ClientTaskIndex, labels: np.ndarray, seed: int, where: str
) -> dict[int, np.ndarray]:
    """The training sample ids (sorted) a delete event removes, per client of the event.

    `labels` are the training labels; a random fraction draws from `seed`, the event's index and
    the client, over every sample the client was dealt (ids already deleted included: `Deletions`
    then leaves those out). Raises `ConfigError` (prefixed by `where`) for a requested sample
    that none of the event's clients holds.
    """
    what = event.params["what"]
    per_client: dict[int, np.ndarray] = {}
    for c in event.clients:
        held = train.held(c)
        if what == "client":
            ids = held
        elif what == "class":
            ids = held[labels[held] == event.params["class"]]
        elif "fraction" in event.params:
            rng = derive_rng(seed, "delete", event.index, c)
            ids = rng.choice(
                held, int(round(float(event.params["fraction"]) * len(held))), replace=False
            )
        else:
            requested = np.asarray(event.params["samples"], dtype=np.int64)
            ids = requested[np.isin(requested, held)]
        per_client[c] = np.sort(ids)
    if what == "samples" and "samples" in event.params:
        requested = np.asarray(event.params["samples"], dtype=np.int64)
        claimed = np.concatenate(list(per_client.values()))
        missing = requested[~np.isin(requested, claimed)]
        if len(missing):
            raise ConfigError(
                f"{where}: sample {int(missing[0])} is not held by clients {list(event.clients)}"
            )
    return per_client


def deletion_file(event_index: int) -> str:
    """The run-folder path (relative, '/'-separated) of the ids the timeline's event
    `event_index` deleted."""
    return f"{DELETIONS_FOLDER}/event_{event_index:05d}.npz"


def deletion_arrays(per_client: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """One event's newly deleted ids as the arrays of its `deletions/event_XXXXX.npz`:

    * `ids` (int64): the deleted training sample ids, ascending;
    * `clients` (int64): beside each id, the client it was deleted from.

    An id appears once per client that held it (twice only for a sample two clients held), so
    `np.unique(ids)` is the event's set of deleted samples. Sorted ids compress well under
    `np.savez_compressed`: an event over a million clients costs about 5 bytes a deleted id.
    """
    if not per_client:
        empty = np.zeros(0, dtype=np.int64)
        return {"ids": empty, "clients": empty.copy()}
    ids = np.concatenate(list(per_client.values())).astype(np.int64, copy=False)
    counts = np.fromiter((len(v) for v in per_client.values()), np.int64, len(per_client))
    clients = np.repeat(np.fromiter(per_client, np.int64, len(per_client)), counts)
    order = np.lexsort((clients, ids))
    return {"ids": ids[order], "clients": clients[order]}
