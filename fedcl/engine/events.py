"""Applying the timeline at the start of each round: log every event, tell the strategy's hooks."""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedcl.engine.flower_compat import node_id_of
from fedcl.scenario.events import Event, events_at
from fedcl.scenario.scenario import Scenario
from fedcl.strategies.base import ContinualStrategy, DeletionRequest, DriftEvent


def event_log_entry(event: Event, scenario: Scenario) -> dict[str, Any]:
    """The events.jsonl line of `event` (deletions also say how many samples each client lost)."""
    entry = event.to_json()
    if event.kind == "delete":
        deleted = scenario.deleted_by_event.get(event.index, {})
        entry["deleted"] = {str(c): int(len(ids)) for c, ids in deleted.items()}
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
                hooks.on_client_task_start(server_round, node, task)
            if server_round in scenario.global_task_starts:
                arrays = hooks.on_task_start(server_round, task, arrays, grid) or arrays
        elif event.kind == "drift":
            params = {k: v for k, v in event.params.items() if k != "type"}
            notice = DriftEvent(server_round, event.params["type"], nodes, params)
            arrays = hooks.on_drift(notice, arrays, grid) or arrays
        elif event.kind == "delete":
            deleted = scenario.deleted_by_event.get(event.index, {})
            request = DeletionRequest(
                server_round,
                event.params["what"],
                nodes,
                {node_id_of(c): ids for c, ids in deleted.items()},
                (int(event.params["class"]),) if event.params["what"] == "class" else (),
            )
            arrays = hooks.on_delete(request, arrays, grid) or arrays
    return arrays, entries


def client_task_ends(scenario: Scenario, server_round: int) -> list[tuple[int, int]]:
    """(client, task) pairs whose task ends with `server_round`: the client trains a different
    task (or none, having left) in the next round, or the run ends."""
    ends = []
    for client in range(scenario.num_clients):
        task = scenario.task_of(client, server_round)
        if task < 0 or server_round >= scenario.leave_round[client]:
            continue
        last = server_round == scenario.rounds or server_round + 1 >= scenario.leave_round[client]
        if last or scenario.previous_task(client, server_round + 1)[1] == server_round + 1:
            ends.append((client, task))
    return ends
