"""A scenario: the dataset cut into tasks, each task spread over clients, and one event timeline
(task switches, drift, deletions, clients joining and leaving) placed on rounds.

The scenario holds index arrays and event descriptions only, never copies of the data: a client's
view of its data in a round is derived from the shared arrays by `fedcl.scenario.view`. It is
built on the driver from the config and seed alone (`fedcl.scenario.builder`), and shipped once to
every actor through Ray's object store, so driver and clients agree on every client's task,
concept and deleted samples.

It scales to millions of registered clients: per-client state is packed into flat arrays (CSR
offsets, a few bytes a client, no Python object per client), and what the driver asks every round
(the global task, the tasks seen, whose task ends, how many clients are available) is read from
tables built once (`fedcl.scenario.round_tables`), so a round costs the same whether a thousand or
a million clients are registered.

Where each part lives: `packed` (the client/task sample index), `streams` (task streams),
`concepts` (drift spans and concepts), `deletion`, `round_tables`, `view` (a client's data view)
and `builder` (from the config). `Scenario` ties them together and answers the queries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from fedcl.scenario import view as views
from fedcl.scenario.builder import build_scenario
from fedcl.scenario.concepts import ClientDrifts, Concept, DriftSpan
from fedcl.scenario.events import Event
from fedcl.scenario.packed import ClientTaskIndex
from fedcl.scenario.round_tables import RoundTables
from fedcl.scenario.streams import NEVER, TaskStreams
from fedcl.scenario.view import ClientView

# Re-exported: other modules import these names from here, and checkpoints written before the
# split (they pickle the strategy, which holds the scenario) name the packed classes here.
__all__ = [
    "NEVER",
    "ClientDrifts",
    "ClientTaskIndex",
    "ClientView",
    "Concept",
    "DriftSpan",
    "RoundTables",
    "Scenario",
    "TaskStreams",
    "build_scenario",
]


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
    # Per task: positions into the training arrays held out for validation (never trained on);
    # empty without a validation split (`dataset.validation`).
    validation_indices: tuple[np.ndarray, ...] = ()

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
        return self.drifts.concept(client, server_round)

    def concept_groups(
        self, server_round: int, clients: np.ndarray
    ) -> list[tuple[Concept, np.ndarray]]:
        """`clients` grouped by the concept each holds in `server_round`: one (concept, members)
        per distinct concept, members in the given order, groups in order of their first member
        (as grouping `concept(c, server_round)` client by client would give). Costs array passes
        over `clients` plus one `concept` per distinct set of drifts, not one per client."""
        return self.drifts.concept_groups(
            server_round,
            np.asarray(clients, dtype=np.int64),
            lambda: self.round_tables.drift_signatures,
        )

    # --- data views (see `fedcl.scenario.view`) ----------------------------------------------
    def client_ids(
        self, client: int, server_round: int, task: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, their tasks) client `client` trains on in `server_round`, deletions
        removed; after a task switch a blurry share of the previous task's data is mixed in.
        With a `task`: its data of that task alone (no blurry mix-in)."""
        return views.client_ids(self, client, server_round, task)

    def task_inputs(self, x: np.ndarray, task: int) -> np.ndarray:
        """`x` as task `task` presents it (its domain transform applied, if it has one)."""
        return views.task_inputs(self.input_transforms, x, task)

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
        domain transform, then each drift at its severity (`fedcl.scenario.view.client_view`)."""
        return views.client_view(self, x_all, y_all, ids, tasks, concept, split)

    def class_mask(self, tasks: np.ndarray, num_classes: int) -> np.ndarray | None:
        """Task-incremental only: (n, num_classes) bool, True for the classes of each row's task."""
        return views.class_mask(self, tasks, num_classes)
