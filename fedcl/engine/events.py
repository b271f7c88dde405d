"""What the timeline tells a strategy: the events of a round before training (logged, with their
hooks) and the task ends after aggregation. Every continual hook is called from here, with one
notion of a global boundary: a task event that every client starts in the same round."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedcl.engine.flower_compat import node_id_of
from fedcl.engine.strategy_calls import arrays_hook, notify
from fedcl.scenario.deletion import deletion_arrays, deletion_file
from fedcl.scenario.events import Event, events_at
from fedcl.scenario.scenario import Scenario
from fedcl.strategies.base import ContinualStrategy, DeletionRequest, DriftEvent

# An event on more clients than this is logged summarised: no per-client list or counts in
# events.jsonl (one line over a million clients weighed 7.9 MB); a delete event's ids file has them.
MAX_LISTED_CLIENTS = 1000
# The key of a delete entry that carries its ids (`deletion_arrays`) to the recorder, which writes
# them to `entry["ids_file"]` and leaves the key out of events.jsonl.
DELETED_IDS_KEY = "_deleted_ids"


def event_log_entry(event: Event, scenario: Scenario) -> dict[str, Any]:
    """The events.jsonl line of `event`: round, kind, clients and parameters, as written in a
    config. An event on every client of more than `MAX_LISTED_CLIENTS` says `clients: all`.

    A delete event's line also holds `deleted_samples` (distinct samples it newly deleted: ids an
    earlier event deleted are not counted again), `deleted_clients` (clients that lost any),
    `ids_file` (the run-folder file of its ids, `fedcl.scenario.deletion.deletion_arrays`) and,
    for at most `MAX_LISTED_CLIENTS` clients, `deleted` (newly deleted samples per client).
    """
    big = len(event.clients) > MAX_LISTED_CLIENTS
    clients: Any = "all" if big and isinstance(event.clients, range) else list(event.clients)
    entry: dict[str, Any] = {"round": event.round, "kind": event.kind, "clients": clients}
    entry.update(event.params)
    if event.kind != "delete":
        return entry
    deleted = scenario.deleted_by_event.get(event.index, {})
    arrays = deletion_arrays(deleted)
    entry["deleted_samples"] = len(np.unique(arrays["ids"]))
    entry["deleted_clients"] = len(deleted)
    if not big:
        entry["deleted"] = {str(c): len(ids) for c, ids in deleted.items()}
    entry["ids_file"] = deletion_file(event.index)
    entry[DELETED_IDS_KEY] = arrays
    return entry


def apply_events(
    scenario: Scenario,
    server_round: int,
    strategy: Any,
    arrays: ArrayRecord,
    grid: Grid,
) -> tuple[ArrayRecord, list[dict[str, Any]]]:
    """Run the hooks of the events of `server_round` (clients see them through the scenario);
    return the possibly updated global arrays and the log entries of the events applied."""
    entries = []
    hooks = strategy if isinstance(strategy, ContinualStrategy) else None
    for event in events_at(scenario.timeline, server_round):
        entries.append(event_log_entry(event, scenario))
        if hooks is None:
            continue
        nodes = tuple(node_id_of(c) for c in event.clients)
        if event.kind == "task":
            task = int(event.params["task"])
            for node in nodes:
                notify(hooks, "on_client_task_start", server_round, server_round, node, task)
            if server_round in scenario.global_task_starts:
                args = (server_round, task, arrays, grid)
                arrays = arrays_hook(hooks, "on_task_start", server_round, arrays, *args)
        elif event.kind == "drift":
            params = {k: v for k, v in event.params.items() if k != "type"}
            notice = DriftEvent(server_round, event.params["type"], nodes, params)
            arrays = arrays_hook(hooks, "on_drift", server_round, arrays, notice, arrays, grid)
        elif event.kind == "delete":
            deleted = scenario.deleted_by_event.get(event.index, {})
            request = DeletionRequest(
                server_round,
                event.params["what"],
                nodes,
                {node_id_of(c): ids for c, ids in deleted.items()},
                (int(event.params["class"]),) if event.params["what"] == "class" else (),
            )
            arrays = arrays_hook(hooks, "on_delete", server_round, arrays, request, arrays, grid)
    return arrays, entries


def end_task_hooks(
    scenario: Scenario, server_round: int, strategy: Any, arrays: ArrayRecord, grid: Grid
) -> ArrayRecord:
    """After aggregation in `server_round`: `on_client_task_end` for every client whose task ends
    here (client order), then `on_task_end` if a global task ends; return the global arrays."""
    if not isinstance(strategy, ContinualStrategy):
        return arrays
    for client, ended in client_task_ends(scenario, server_round):
        notify(
            strategy, "on_client_task_end", server_round, server_round, node_id_of(client), ended
        )
    if scenario.global_task_starts and server_round in scenario.task_end_rounds():
        task = scenario.global_task(server_round)
        args = (server_round, task, arrays, grid)
        arrays = arrays_hook(strategy, "on_task_end", server_round, arrays, *args)
    return arrays


def client_task_ends(scenario: Scenario, server_round: int) -> list[tuple[int, int]]:
    """(client, task) pairs whose task ends with `server_round` (`Scenario.client_task_ends`)."""
    return scenario.client_task_ends(server_round)
