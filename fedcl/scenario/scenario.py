"""A scenario: the dataset cut into tasks, each task spread over clients, and one event timeline
(task switches, drift, deletions, clients joining and leaving) placed on rounds.

The scenario holds index arrays and event descriptions only, never copies of the data: a client's
view of its data in a round is derived from the shared arrays by `client_view`. It is built on
the driver from the config and seed alone, and shipped once to every actor through Ray's object
store, so driver and clients agree on every client's task, concept and deleted samples.

It scales to millions of registered clients: per-client state is packed into flat arrays (CSR
offsets, a few bytes a client, no Python object per client), and what the driver asks every round
(the global task, the tasks seen, whose task ends, how many clients are available) is read from
tables built once, so a round costs the same whether a thousand or a million clients are
registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedcl.errors import ConfigError
from fedcl.scenario.datasets import ArrayDataset
from fedcl.scenario.drift import Drift, make_drift
from fedcl.scenario.events import (
    DRIFT_EVENT_KEYS,
    Event,
    build_timeline,
    generate_events,
    parse_event,
)
from fedcl.scenario.partition import PARTITIONS, partition_packed
from fedcl.scenario.tasks import class_incremental_split, task_sample_mask
from fedcl.seeding import derive_rng, derive_seed

SCENARIOS = ("class_incremental", "task_incremental", "domain_incremental", "permuted")
DOMAIN_TRANSFORMS = ("permutation", "rotation")
BOUNDARIES = ("global", "async")
NEVER = np.iinfo(np.int64).max  # deletion round of a sample that is never deleted


@dataclass(frozen=True)
class ClientTaskIndex:
    """Per task, every client's training sample positions, packed CSR-style (bytes per client)."""

    indices: tuple[np.ndarray, ...]  # per task: all clients' positions, client after client
    offsets: tuple[np.ndarray, ...]  # per task: (num_clients + 1,) boundaries into `indices`

    def get(self, client: int, task: int) -> np.ndarray:
        """Return the positions (into the training arrays) client `client` holds for task `task`."""
        start, stop = self.offsets[task][client], self.offsets[task][client + 1]
        return self.indices[task][start:stop]


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
        owners, order = _group_by_client(clients)
        sizes = [len(c) for c in clients]
        counts = np.bincount(owners, minlength=num_clients)
        return cls(
            offsets=_offsets(counts),
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


@dataclass(frozen=True)
class DriftSpan:
    """A drift on a client: from `start`, at a severity that depends on the round and the mode."""

    drift: Drift
    start: int
    mode: str  # sudden | incremental | recurrent
    ramp: int = 1
    until: int | None = None  # recurrent: the original concept returns at this round
    event: int = 0  # timeline index of the drift event

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
        owners, order = _group_by_client(clients)
        drifted, counts = np.unique(owners, return_counts=True)
        span_ids = np.repeat(np.arange(len(spans)), [len(c) for c in clients])[order]
        return cls(tuple(spans), drifted, _offsets(counts), span_ids)

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


@dataclass(frozen=True)
class ClientView:
    """What a client trains on in one round: sample ids, inputs, labels, and each sample's task."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    tasks: np.ndarray


def _group_by_client(clients: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The clients of events listed one after another, sorted, and the (stable) sorting order:
    each client's entries keep the events' order."""
    owners = np.concatenate(clients) if clients else np.zeros(0, dtype=np.int64)
    order = np.argsort(owners, kind="stable")
    return owners[order], order


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


@dataclass(frozen=True)
class Scenario:
    """Tasks, the timeline of events, and which training samples each client holds per task."""

    num_clients: int
    rounds: int
    kind: str
    task_classes: tuple[np.ndarray, ...]
    test_indices: tuple[np.ndarray, ...]  # per task: positions into the test arrays
    train: ClientTaskIndex
    streams: TaskStreams  # per client: rounds at which it starts a task, and which task
    join_round: np.ndarray  # per client (int64)
    leave_round: np.ndarray  # per client (int64): the first round it is gone
    drifts: ClientDrifts
    deletion_round: np.ndarray  # per training sample (int64): NEVER if never deleted
    timeline: tuple[Event, ...] = ()
    deleted_by_event: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    input_transforms: tuple[dict[str, Any] | None, ...] = ()  # per task (domain-incremental)
    blurry_share: float = 0.0
    blurry_rounds: int = 1
    global_task_starts: dict[int, int] = field(default_factory=dict)  # round -> task, all clients
    seed: int = 0

    def __getstate__(self) -> dict[str, Any]:
        # The driver's round tables are rebuilt where needed, never shipped to the actors.
        state = dict(self.__dict__)
        state.pop("round_tables", None)
        return state

    @cached_property
    def round_tables(self) -> RoundTables:
        """The per-round tables behind the driver's round queries (built on first use)."""
        return RoundTables(
            self.streams,
            self.drifts,
            self.join_round,
            self.leave_round,
            self.rounds,
            self.num_tasks,
        )

    # --- tasks ------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        """The number of distinct tasks in the scenario."""
        return len(self.task_classes)

    @property
    def task_incremental(self) -> bool:
        """Whether the task id is known at train and test time (a head per task)."""
        return self.kind == "task_incremental"

    def task_of(self, client: int, server_round: int) -> int:
        """The task client `client` trains on in round `server_round`; -1 before its first task."""
        position = self.streams.position(client, server_round)
        return int(self.streams.tasks[position]) if position >= 0 else -1

    def tasks_of(self, clients: np.ndarray, server_round: int) -> np.ndarray:
        """`task_of` for many clients at once (int64 array, -1 before a client's first task)."""
        clients = np.asarray(clients, dtype=np.int64)
        positions = self.streams.positions(clients, server_round)
        tasks = self.streams.tasks[np.maximum(positions, 0)].astype(np.int64)
        return np.where(positions >= 0, tasks, -1)

    def previous_task(self, client: int, server_round: int) -> tuple[int, int]:
        """(task before the current one, round the current one started); (-1, start) if none."""
        position = self.streams.position(client, server_round)
        if position < 0:
            return -1, server_round
        start = int(self.streams.rounds[position])
        first = self.streams.offsets[client]
        return (int(self.streams.tasks[position - 1]) if position > first else -1), start

    def seen_tasks(self, server_round: int) -> list[int]:
        """Every task some client has started by `server_round`."""
        return np.flatnonzero(self.round_tables.first_start <= server_round).tolist()

    def global_task(self, server_round: int) -> int:
        """The task most available clients train in `server_round` (ties: the lowest); with no
        client available, the highest task any client is on (-1 if none has started)."""
        tables = self.round_tables
        row = tables.row(server_round)
        counts = tables.available_tasks[row]
        if counts.any():
            return int(np.argmax(counts))
        started = np.flatnonzero(tables.current_tasks[row])
        return int(started[-1]) if len(started) else -1

    def client_task_ends(self, server_round: int) -> list[tuple[int, int]]:
        """(client, task) pairs whose task ends with `server_round`, clients ascending: the
        client trains a different task (or none, having left) in the next round, or the run
        ends. Costs the number of pairs, not the number of clients."""
        clients, tasks = self.round_tables.task_ends(server_round)
        return list(zip(clients.tolist(), tasks.tolist(), strict=True))

    def task_end_rounds(self) -> list[int]:
        """Last round of each global task phase (a task all clients switch to at once)."""
        starts = sorted(self.global_task_starts)
        return [s - 1 for s in starts[1:]] + [self.rounds]

    def is_sequential(self) -> bool:
        """Whether tasks 0, 1, ..., T-1 come once each, in order, for all clients at once (the
        setting in which the task-end accuracy matrix, BWT and FWT are defined)."""
        order = [self.global_task_starts[r] for r in sorted(self.global_task_starts)]
        only_global = len(self.streams.rounds) == len(order) * self.num_clients
        return order == list(range(self.num_tasks)) and only_global

    def train_indices(self, client: int, task: int) -> np.ndarray:
        """Positions into the training arrays of client `client`'s data for task `task`."""
        return self.train.get(client, task)

    # --- availability, deletion, drift --------------------------------------------------------
    def available(self, server_round: int) -> list[int]:
        """Clients that can be sampled in `server_round`: joined, not left, with a task."""
        return self.available_array(server_round).tolist()

    def available_array(self, server_round: int) -> np.ndarray:
        """`available` as a read-only int64 array, ascending. Computed once per change of the
        available set (a join, a leave, a first task), then shared by the rounds that follow."""
        return self.round_tables.available_ids(server_round)

    def available_count(self, server_round: int) -> int:
        """How many clients are available in `server_round`, read from a table."""
        tables = self.round_tables
        return int(tables.available_counts[tables.row(server_round)])

    def deleted(self, ids: np.ndarray, server_round: int) -> np.ndarray:
        """Bool mask: which of the training sample `ids` are deleted as of `server_round`."""
        return self.deletion_round[ids] <= server_round

    def concept(self, client: int, server_round: int) -> Concept:
        """The drifts in force on `client` in `server_round`, with their severities."""
        spans = self.drifts.of(client)
        return tuple((s, s.severity(server_round)) for s in spans if s.severity(server_round) > 0)

    def concept_groups(
        self, server_round: int, clients: np.ndarray
    ) -> list[tuple[Concept, np.ndarray]]:
        """`clients` grouped by the concept each holds in `server_round`: one (concept, members)
        per distinct concept, members in the given order, groups in order of their first member
        (as grouping `concept(c, server_round)` client by client would give). Costs array passes
        over `clients` plus one `concept` per distinct set of drifts, not one per client."""
        clients = np.asarray(clients, dtype=np.int64)
        if not len(clients):
            return []
        if not len(self.drifts.clients):
            return [((), clients)]
        # Clients under the same drift spans hold the same concept: one `concept` call each.
        rows = self.drifts.rows(clients)
        signature = np.full(len(clients), -1, dtype=np.int64)
        signature[rows >= 0] = self.round_tables.drift_signatures[rows[rows >= 0]]
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

    # --- data views -----------------------------------------------------------------------
    def client_ids(self, client: int, server_round: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, their tasks) client `client` trains on in `server_round`, deletions
        removed; after a task switch a blurry share of the previous task's data is mixed in."""
        task = self.task_of(client, server_round)
        if task < 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        ids = self.train_indices(client, task)
        tasks = np.full(len(ids), task, dtype=np.int64)
        previous, start = self.previous_task(client, server_round)
        if self.blurry_share > 0 and previous >= 0 and server_round < start + self.blurry_rounds:
            old = self.train_indices(client, previous)
            rng = derive_rng(self.seed, "blurry", client, start)
            count = min(len(old), int(round(self.blurry_share * len(ids))))
            mixed = np.sort(rng.choice(old, count, replace=False))
            ids = np.concatenate([ids, mixed])
            tasks = np.concatenate([tasks, np.full(count, previous, dtype=np.int64)])
        keep = ~self.deleted(ids, server_round)
        return ids[keep], tasks[keep]

    def task_inputs(self, x: np.ndarray, task: int) -> np.ndarray:
        """`x` as task `task` presents it (its domain transform applied, if it has one)."""
        transform = self.input_transforms[task] if self.input_transforms else None
        if transform is None:
            return x
        if transform["kind"] == "permutation":
            return x.reshape(len(x), -1)[:, transform["permutation"]].reshape(x.shape)
        from scipy.ndimage import rotate  # imported here: only rotated-domain runs need scipy

        return rotate(x, transform["degrees"], axes=(-2, -1), reshape=False, order=1)

    def view(
        self,
        x_all: np.ndarray,
        y_all: np.ndarray,
        ids: np.ndarray,
        tasks: np.ndarray,
        concept: Concept,
        split: str = "train",
    ) -> ClientView:
        """Samples `ids` (of tasks `tasks`) as a client under `concept` sees them: each task's
        domain transform, then each drift at its severity."""
        x, y = x_all[ids], y_all[ids]
        for task in np.unique(tasks):
            rows = tasks == task
            if self.input_transforms and self.input_transforms[task] is not None:
                x[rows] = self.task_inputs(x[rows], int(task))
        for span, severity in concept:
            x, y, keep = span.drift.apply(x, y, ids, severity, split=split)
            x, y, ids, tasks = x[keep], y[keep], ids[keep], tasks[keep]
        return ClientView(ids, x, y, tasks)

    def class_mask(self, tasks: np.ndarray, num_classes: int) -> np.ndarray | None:
        """Task-incremental only: (n, num_classes) bool, True for the classes of each row's task."""
        if not self.task_incremental:
            return None
        mask = np.zeros((len(tasks), num_classes), dtype=bool)
        for task in np.unique(tasks):
            mask[np.ix_(tasks == task, self.task_classes[task])] = True
        return mask


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


# --- building -----------------------------------------------------------------------------------
def _task_classes(cfg: DictConfig, num_classes: int) -> list[np.ndarray]:
    sc = cfg.scenario
    if sc.kind in ("domain_incremental", "permuted"):
        return [np.arange(num_classes)] * sc.num_tasks
    order_rng = derive_rng(cfg.seed, "class-order") if sc.shuffle_classes else None
    return class_incremental_split(
        num_classes,
        sc.num_tasks,
        class_order=list(sc.class_order) if sc.class_order is not None else None,
        rng=order_rng,
    )


def _input_transforms(cfg: DictConfig, dataset: ArrayDataset) -> list[dict[str, Any] | None]:
    sc = cfg.scenario
    if sc.kind not in ("domain_incremental", "permuted"):
        return []
    transform = "permutation" if sc.kind == "permuted" else sc.domain_transform
    if transform not in DOMAIN_TRANSFORMS:
        raise ConfigError(
            f"unknown scenario.domain_transform '{transform}'; "
            f"valid: {', '.join(DOMAIN_TRANSFORMS)}"
        )
    if transform == "rotation" and len(dataset.input_shape) != 3:
        raise ConfigError(
            f"scenario.domain_transform=rotation needs image input (C, H, W); dataset "
            f"'{dataset.name}' has {dataset.input_shape}: use permutation"
        )
    # As FOT's PMNIST and rotated-MNIST protocols: task 0 is the plain input.
    transforms: list[dict[str, Any] | None] = [None]
    width = int(np.prod(dataset.input_shape))
    for t in range(1, sc.num_tasks):
        if transform == "permutation":
            perm = derive_rng(cfg.seed, "permutation", t).permutation(width)
            transforms.append({"kind": "permutation", "permutation": perm})
        else:
            transforms.append({"kind": "rotation", "degrees": t * 180.0 / sc.num_tasks})
    return transforms


def _stream_events(cfg: DictConfig) -> list[dict[str, Any]]:
    """The task events the scenario's stream settings imply (global or per-client boundaries)."""
    sc, rounds = cfg.scenario, cfg.rounds
    stream = list(sc.stream) if sc.stream is not None else list(range(sc.num_tasks))
    bad = [t for t in stream if not 0 <= t < sc.num_tasks]
    if not stream or bad:
        raise ConfigError(
            f"scenario.stream must list tasks in 0..{sc.num_tasks - 1}, got {list(stream)}"
        )
    per_task = sc.rounds_per_task or max(1, rounds // len(stream))
    if sc.boundaries not in BOUNDARIES:
        raise ConfigError(
            f"unknown scenario.boundaries '{sc.boundaries}'; valid: {', '.join(BOUNDARIES)}"
        )
    if sc.boundaries == "global":
        if per_task * (len(stream) - 1) >= rounds:
            raise ConfigError(
                f"{len(stream)} stream entries of {per_task} rounds do not fit in rounds={rounds}"
            )
        return [
            {"round": 1 + k * per_task, "kind": "task", "clients": "all", "task": task}
            for k, task in enumerate(stream)
        ]
    events = []
    span = sc.async_rounds_per_task or [per_task, per_task]
    if len(span) != 2 or not 1 <= span[0] <= span[1]:
        raise ConfigError(f"scenario.async_rounds_per_task must be [low, high], got {list(span)}")
    for client in range(cfg.clients.num):
        rng = derive_rng(cfg.seed, "stream", client)
        start = 1 + int(rng.integers(0, sc.async_start + 1))
        order = list(rng.permutation(stream)) if sc.async_shuffle else stream
        for task in order:
            if start > rounds:
                break
            events.append({"round": start, "kind": "task", "clients": [client], "task": int(task)})
            start += int(rng.integers(span[0], span[1] + 1))
    return events


def _partition(
    cfg: DictConfig, dataset: ArrayDataset, task_classes: list[np.ndarray]
) -> tuple[ClientTaskIndex, list[np.ndarray]]:
    if cfg.clients.partition not in PARTITIONS:
        raise ConfigError(
            f"unknown clients.partition '{cfg.clients.partition}'; valid: {', '.join(PARTITIONS)}"
        )
    indices, offsets, test_indices = [], [], []
    for task, classes in enumerate(task_classes):
        positions = np.flatnonzero(task_sample_mask(dataset.y_train, classes))
        packed, bounds = partition_packed(
            dataset.y_train[positions],
            cfg.clients.num,
            cfg.clients.partition,
            derive_rng(cfg.seed, "partition", task),
            alpha=cfg.clients.alpha,
            shards_per_client=cfg.clients.shards_per_client,
        )
        indices.append(positions[packed])
        offsets.append(bounds)
        test_indices.append(np.flatnonzero(task_sample_mask(dataset.y_test, classes)))
    return ClientTaskIndex(tuple(indices), tuple(offsets)), test_indices


def build_scenario(cfg: DictConfig, dataset: ArrayDataset) -> Scenario:
    """Build the scenario the config describes and validate its whole timeline up front.

    Every random draw derives from `cfg.seed`; a malformed event (unknown kind, a round beyond the
    run, an unknown client, a class not in the dataset, bad drift parameters) raises a one-line
    `ConfigError` naming it before anything runs.
    """
    sc = cfg.scenario
    if sc.kind not in SCENARIOS:
        raise ConfigError(f"unknown scenario.kind '{sc.kind}'; valid: {', '.join(SCENARIOS)}")
    task_classes = _task_classes(cfg, dataset.num_classes)
    transforms = _input_transforms(cfg, dataset)
    train, test_indices = _partition(cfg, dataset, task_classes)
    num_clients, rounds = cfg.clients.num, cfg.rounds

    raw_events = [(f"events[{i}]", e) for i, e in enumerate(_plain(cfg.events))]
    generated = generate_events(
        _plain(cfg.generate),
        rounds=rounds,
        num_clients=num_clients,
        rng_for=lambda i, r: derive_rng(cfg.seed, "generate", i, r),
    )
    raw_events += [(f"generated event {e['kind']!r} at round {e['round']}", e) for e in generated]
    raw_events = [
        (f"scenario stream (task {e['task']})", e) for e in _stream_events(cfg)
    ] + raw_events
    limits = dict(
        rounds=rounds,
        num_clients=num_clients,
        num_classes=dataset.num_classes,
        num_tasks=len(task_classes),
    )
    timeline = build_timeline([parse_event(e, where, **limits) for where, e in raw_events])
    state = _TimelineState.start(num_clients, rounds, len(dataset.y_train))
    for event in timeline:
        if event.kind == "task":
            state.task(event)
        elif event.kind in ("join", "leave"):
            state.join_or_leave(event)
        elif event.kind == "drift":
            state.drift(event, _drift_span(event, cfg.seed, dataset))
        elif event.kind == "delete":
            where = f"event at round {event.round} ({event.kind})"
            state.delete(event, _deleted_ids(event, train, dataset, cfg.seed, where))
    return Scenario(
        num_clients=num_clients,
        rounds=rounds,
        kind=sc.kind,
        task_classes=tuple(task_classes),
        test_indices=tuple(test_indices),
        train=train,
        streams=TaskStreams.build(
            num_clients, state.task_clients, state.task_rounds, state.task_ids
        ),
        join_round=state.join_round,
        leave_round=state.leave_round,
        drifts=ClientDrifts.build(state.spans, state.span_clients),
        deletion_round=state.deletion_round,
        timeline=timeline,
        deleted_by_event=state.deleted_by_event,
        input_transforms=tuple(transforms),
        blurry_share=float(sc.blurry),
        blurry_rounds=int(sc.blurry_rounds),
        global_task_starts=state.global_starts,
        seed=cfg.seed,
    )


@dataclass
class _TimelineState:
    """What the timeline's events leave on the clients, gathered in timeline order."""

    num_clients: int
    join_round: np.ndarray
    leave_round: np.ndarray
    deletion_round: np.ndarray
    task_clients: list[np.ndarray] = field(default_factory=list)
    task_rounds: list[int] = field(default_factory=list)
    task_ids: list[int] = field(default_factory=list)
    spans: list[DriftSpan] = field(default_factory=list)
    span_clients: list[np.ndarray] = field(default_factory=list)
    deleted_by_event: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    global_starts: dict[int, int] = field(default_factory=dict)

    @classmethod
    def start(cls, num_clients: int, rounds: int, num_samples: int) -> _TimelineState:
        """Before any event: every client joined from round 1, none leaves, nothing deleted."""
        return cls(
            num_clients,
            join_round=np.ones(num_clients, dtype=np.int64),
            leave_round=np.full(num_clients, rounds + 1, dtype=np.int64),
            deletion_round=np.full(num_samples, NEVER, dtype=np.int64),
        )

    def task(self, event: Event) -> None:
        """The event's clients start its task."""
        self.task_clients.append(_client_array(event.clients))
        self.task_rounds.append(event.round)
        self.task_ids.append(int(event.params["task"]))
        if len(event.clients) == self.num_clients:  # clients are distinct: this is everyone
            self.global_starts[event.round] = int(event.params["task"])

    def join_or_leave(self, event: Event) -> None:
        """The event's clients join (from its round) or leave (the earliest leave counts)."""
        clients = _client_array(event.clients)
        if event.kind == "join":
            self.join_round[clients] = event.round
        else:
            self.leave_round[clients] = np.minimum(self.leave_round[clients], event.round)

    def drift(self, event: Event, span: DriftSpan) -> None:
        """The event's clients come under `span`."""
        self.spans.append(span)
        self.span_clients.append(_client_array(event.clients))

    def delete(self, event: Event, per_client: dict[int, np.ndarray]) -> None:
        """Samples `per_client` are deleted from the event's round; a deleted client leaves."""
        for c, ids in per_client.items():
            self.deletion_round[ids] = np.minimum(self.deletion_round[ids], event.round)
            if event.params["what"] == "client":
                self.leave_round[c] = min(self.leave_round[c], event.round)
        self.deleted_by_event[event.index] = per_client


def _client_array(clients: tuple[int, ...] | range) -> np.ndarray:
    if isinstance(clients, range):
        return np.arange(clients.start, clients.stop, clients.step, dtype=np.int64)
    return np.asarray(clients, dtype=np.int64)


def _drift_span(event: Event, seed: int, dataset: ArrayDataset) -> DriftSpan:
    """The drift a drift event describes, as a span starting in its round."""
    params = {k: v for k, v in event.params.items() if k not in DRIFT_EVENT_KEYS}
    drift = make_drift(
        event.params["type"],
        params,
        seed=derive_seed(seed, "drift", event.index),
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
    )
    return DriftSpan(
        drift,
        event.round,
        event.params["mode"],
        ramp=int(event.params.get("ramp", 1)),
        until=event.params.get("until"),
        event=event.index,
    )


def _client_ids(train: ClientTaskIndex, client: int) -> np.ndarray:
    """Every training sample client `client` holds, over all tasks."""
    return np.concatenate([train.get(client, t) for t in range(len(train.indices))])


def _deleted_ids(
    event: Event, train: ClientTaskIndex, dataset: ArrayDataset, seed: int, where: str
) -> dict[int, np.ndarray]:
    """The training sample ids a delete event removes, per client."""
    what = event.params["what"]
    per_client: dict[int, np.ndarray] = {}
    for c in event.clients:
        held = _client_ids(train, c)
        if what == "client":
            ids = held
        elif what == "class":
            ids = held[dataset.y_train[held] == event.params["class"]]
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


def _plain(node: Any) -> list[dict[str, Any]]:
    """Config list of event mappings as plain Python."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else []  # type: ignore[return-value]
