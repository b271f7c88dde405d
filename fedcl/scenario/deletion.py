"""Data deletion: which training samples a delete event removes, and the round from which each
sample is gone."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedcl.errors import ConfigError
from fedcl.scenario.events import Event
from fedcl.scenario.packed import ClientTaskIndex
from fedcl.scenario.streams import NEVER
from fedcl.seeding import derive_rng


@dataclass
class Deletions:
    """The deletions of a timeline, gathered event by event in timeline order."""

    rounds: np.ndarray  # per training sample (int64): the round it is deleted in, NEVER if never
    # Per delete event (by timeline index): the ids it removes, per client.
    by_event: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def none(cls, num_samples: int) -> Deletions:
        """No sample deleted."""
        return cls(np.full(num_samples, NEVER, dtype=np.int64))

    def record(self, event: Event, per_client: dict[int, np.ndarray]) -> None:
        """Samples `per_client` are deleted from the event's round (an earlier deletion stands)."""
        for ids in per_client.values():
            self.rounds[ids] = np.minimum(self.rounds[ids], event.round)
        self.by_event[event.index] = per_client


def deleted_ids(
    event: Event, train: ClientTaskIndex, labels: np.ndarray, seed: int, where: str
) -> dict[int, np.ndarray]:
    """The training sample ids (sorted) a delete event removes, per client of the event.

    `labels` are the training labels; a random fraction draws from `seed`, the event's index and
    the client. Raises `ConfigError` (prefixed by `where`) for a requested sample that none of
    the event's clients holds.
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
