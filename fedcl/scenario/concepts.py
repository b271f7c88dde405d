"""Which drifts are in force on which client, when: drift spans, the clients under them, and the
concept (drifts with their severities) a client holds in a round."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedcl.scenario.drift import Drift, make_drift
from fedcl.scenario.events import DRIFT_EVENT_KEYS, Event
from fedcl.scenario.packed import csr_offsets, group_by_client
from fedcl.seeding import derive_seed


@dataclass(frozen=True)
class DriftSpan:
    """A drift on a client: from `start`, at a severity that depends on the round and the mode."""

    drift: Drift
    start: int
    mode: str  # sudden | incremental | recurrent
    ramp: int = 1
    until: int | None = None  # recurrent: the original concept returns at this round
    event: int = 0  # timeline index of the drift event

    @classmethod
    def from_event(
        cls, event: Event, *, seed: int, num_classes: int, input_shape: tuple[int, ...]
    ) -> DriftSpan:
        """The drift a (validated) drift event describes, as a span starting in its round; its
        seed derives from the run's `seed` and the event's timeline index."""
        params = {k: v for k, v in event.params.items() if k not in DRIFT_EVENT_KEYS}
        drift = make_drift(
            event.params["type"],
            params,
            seed=derive_seed(seed, "drift", event.index),
            num_classes=num_classes,
            input_shape=input_shape,
        )
        return cls(
            drift,
            event.round,
            event.params["mode"],
            ramp=int(event.params.get("ramp", 1)),
            until=event.params.get("until"),
            event=event.index,
        )

    def severity(self, server_round: int) -> float:
        """0 before the drift and after a recurrent drift ends; ramps up to 1 when incremental."""
        if server_round < self.start or (self.until is not None and server_round >= self.until):
            return 0.0
        if self.mode == "incremental":
            return min(1.0, (server_round - self.start + 1) / self.ramp)
        return 1.0


Concept = tuple[tuple[DriftSpan, float], ...]  # the drifts in force on a client, with severities


@dataclass(frozen=True)
class ClientDrifts:
    """The drift spans of the clients that have any, packed: `clients[i]` is under
    `spans[span_ids[j]]` for `j` in `offsets[i]:offsets[i + 1]`, in timeline order. Clients
    never drifted cost nothing."""

    spans: tuple[DriftSpan, ...] = ()
    clients: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sorted
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))
    span_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @classmethod
    def build(cls, spans: list[DriftSpan], clients: list[np.ndarray]) -> ClientDrifts:
        """Pack span `k` (in timeline order) applying to `clients[k]`."""
        if not spans:
            return cls()
        owners, order = group_by_client(clients)
        drifted, counts = np.unique(owners, return_counts=True)
        span_ids = np.repeat(np.arange(len(spans)), [len(c) for c in clients])[order]
        return cls(tuple(spans), drifted, csr_offsets(counts), span_ids)

    def rows(self, clients: np.ndarray) -> np.ndarray:
        """Each client's row in `self.clients`, -1 for a client never drifted."""
        rows = np.searchsorted(self.clients, clients)
        hit = rows < len(self.clients)
        hit[hit] = self.clients[rows[hit]] == clients[hit]
        return np.where(hit, rows, -1)

    def of(self, client: int) -> tuple[DriftSpan, ...]:
        """The spans client `client` is under, in timeline order."""
        if not len(self.clients):
            return ()
        row = int(np.searchsorted(self.clients, client))
        if row == len(self.clients) or self.clients[row] != client:
            return ()
        return tuple(
            self.spans[j] for j in self.span_ids[self.offsets[row] : self.offsets[row + 1]]
        )

    def signatures(self) -> np.ndarray:
        """Per row, an id shared exactly by the rows under the same spans."""
        counts = np.diff(self.offsets)
        table = np.full((len(self.clients), int(counts.max(initial=0))), -1, dtype=np.int64)
        rows = np.repeat(np.arange(len(self.clients)), counts)
        table[rows, np.arange(len(rows)) - self.offsets[rows]] = self.span_ids
        return np.unique(table, axis=0, return_inverse=True)[1].reshape(-1)

    def concept(self, client: int, server_round: int) -> Concept:
        """The drifts in force on `client` in `server_round`, with their severities."""
        spans = self.of(client)
        return tuple((s, s.severity(server_round)) for s in spans if s.severity(server_round) > 0)

    def concept_groups(
        self, server_round: int, clients: np.ndarray, signatures: Callable[[], np.ndarray]
    ) -> list[tuple[Concept, np.ndarray]]:
        """`clients` (int64) grouped by the concept each holds in `server_round`: one (concept,
        members) per distinct concept, members in the given order, groups in order of their first
        member (as grouping `concept(c, server_round)` client by client would give). Costs array
        passes over `clients` plus one `concept` per distinct set of drifts, not one per client.

        `signatures` returns `signatures()` as cached by the caller; it is called only when some
        client is drifted, so the caller's cache is not built for nothing.
        """
        if not len(clients):
            return []
        if not len(self.clients):
            return [((), clients)]
        # Clients under the same drift spans hold the same concept: one `concept` call each.
        rows = self.rows(clients)
        signature = np.full(len(clients), -1, dtype=np.int64)
        signature[rows >= 0] = signatures()[rows[rows >= 0]]
        order = np.argsort(signature, kind="stable")
        firsts = np.unique(signature[order], return_index=True)[1]
        merged: dict[tuple[tuple[int, float], ...], tuple[Concept, list[np.ndarray]]] = {}
        for first, stop in zip(firsts, [*firsts[1:], len(order)], strict=True):
            members = order[first:stop]  # positions into `clients`
            concept = self.concept(int(clients[members[0]]), server_round)
            key = tuple((span.event, severity) for span, severity in concept)
            merged.setdefault(key, (concept, []))[1].append(members)
        groups = [(concept, np.sort(np.concatenate(parts))) for concept, parts in merged.values()]
        groups.sort(key=lambda group: group[1][0])
        return [(concept, clients[positions]) for concept, positions in groups]
