"""The states a `retrain` rollback needs, kept automatically and compactly.

Deleted data can have influenced the run only from the round its client started the task it
belongs to: before that no client trained on it, put it in a replay buffer or answered a query
about it. The timeline says up front which samples each delete event removes and when each
client starts each task, so each event's rollback round (the round before its data first became
visible) is known before the run starts. The store keeps the state after exactly those rounds,
one per pending event (fewer when they share one), and drops each once its event is handled.
This holds for every strategy, also those that gather data through queries (prototypes, FOT's
activations) rather than training; a rollback may go further back than the first round the
data was trained on, never less far.

States are checkpoints (`fedcl.engine.checkpoint`: atomic, verified, no pickle) under
`unlearning/rollback/` in the run folder. A rollback and replay rewrites the history after the
state it rolled back to: the replayed rounds write the states of later events again.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedcl.engine.checkpoint import (
    Checkpoint,
    Snapshot,
    checkpoint_dir,
    client_states,
    read_checkpoint,
    write_checkpoint,
)
from fedcl.engine.grid import RayGrid
from fedcl.scenario.scenario import Scenario
from fedcl.unlearning.data_absent import sample_tasks

FOLDER = "unlearning/rollback"


def first_visible_round(scenario: Scenario, event_index: int) -> int | None:
    """The first round in which some data the delete event `event_index` removes is part of its
    client's current or past tasks; None when that never happens before the deletion."""
    streams = scenario.streams
    first = None
    for client, ids in scenario.deleted_by_event.get(event_index, {}).items():
        entries = slice(streams.offsets[client], streams.offsets[client + 1])
        rounds, tasks = streams.rounds[entries], streams.tasks[entries]
        for task in np.unique(sample_tasks(scenario, client, ids)):
            starts = rounds[tasks == task]
            if len(starts):
                first = int(starts.min()) if first is None else min(first, int(starts.min()))
    return first


class RollbackStore:
    """Rollback states of the run's current history, for the delete events still pending."""

    def __init__(self, run_dir: Path, scenario: Scenario, vectorize: str) -> None:
        self.base = Path(run_dir) / FOLDER
        self.vectorize = vectorize
        # Per pending delete event (timeline index): the round of the state it rolls back to.
        self.pending: dict[int, int] = {}
        for event in scenario.timeline:
            if event.kind != "delete":
                continue
            visible = first_visible_round(scenario, event.index)
            if visible is not None and visible < event.round:
                self.pending[event.index] = visible - 1
        self.written = 0  # states written, over the run
        self.bytes = 0  # their size

    def wanted(self, server_round: int) -> bool:
        """Whether the state after `server_round` is a pending event's rollback state."""
        return server_round in self.pending.values()

    def observe(self, server_round: int, arrays: ArrayRecord, strategy: Any, grid: RayGrid) -> None:
        """After `server_round` (0: before round 1): keep its state if an event needs it."""
        if self.wanted(server_round):
            self.write(server_round, arrays, strategy, grid)

    def write(self, server_round: int, arrays: ArrayRecord, strategy: Any, grid: RayGrid) -> None:
        """Keep the state after `server_round` (replacing one kept from another history)."""
        written = write_checkpoint(
            self.base,
            Snapshot(server_round, arrays, strategy, client_states(grid), {}, {}, self.vectorize),
        )
        if written.unsaved_strategy:
            raise RuntimeError(written.unsaved_strategy)
        self.written += 1
        self.bytes += written.size

    def rollback_round(self, indices: list[int]) -> int | None:
        """The round to roll back to for the events `indices`: the earliest of theirs; None when
        none of their data was ever visible (nothing to undo)."""
        rounds = [self.pending[i] for i in indices if i in self.pending]
        return min(rounds) if rounds else None

    def state(self, server_round: int) -> Checkpoint:
        """The kept state after `server_round`, verified."""
        return read_checkpoint(checkpoint_dir(self.base, server_round))

    def handled(self, indices: list[int]) -> None:
        """Events `indices` are unlearned: drop the states no pending event needs."""
        for index in indices:
            self.pending.pop(index, None)
        folder = self.base / "checkpoints"
        for path in folder.glob("round_*") if folder.is_dir() else ():
            if not self.wanted(int(path.name.split("_")[1])):
                shutil.rmtree(path, ignore_errors=True)
