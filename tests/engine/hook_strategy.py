"""A FedAvg that records every continual hook call, for tests."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedcl.strategies.base import ContinualStrategy


class RecordingFedAvg(FedAvg, ContinualStrategy):
    """FedAvg that appends (hook, round, details) to `calls` for every hook the loop calls."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple] = []

    def on_task_start(self, server_round, task, arrays, grid):
        self.calls.append(("task_start", server_round, task))

    def on_task_end(self, server_round, task, arrays, grid):
        self.calls.append(("task_end", server_round, task))

    def on_client_task_start(self, server_round, node_id, task):
        self.calls.append(("client_task_start", server_round, node_id, task))

    def on_client_task_end(self, server_round, node_id, task):
        self.calls.append(("client_task_end", server_round, node_id, task))

    def on_drift(self, drift, arrays, grid):
        self.calls.append(("drift", drift.server_round, drift.type, drift.node_ids))

    def on_delete(self, deletion, arrays, grid):
        sizes = {node: len(ids) for node, ids in deletion.sample_ids.items()}
        self.calls.append(("delete", deletion.server_round, deletion.what, deletion.classes, sizes))
