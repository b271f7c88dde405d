"""Strategies for tests: one that records every call the loop makes, ones that misbehave."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg, Strategy

from fedcl.strategies.base import ContinualStrategy


class RecordingFedAvg(FedAvg, ContinualStrategy):
    """FedAvg that appends (hook, round, details) to `calls` for every hook the loop calls."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple] = []

    def on_run_start(self, scenario):
        super().on_run_start(scenario)
        self.calls.append(("run_start", scenario.num_clients, scenario.num_tasks))

    def configure_train(self, server_round, arrays, config, grid):
        self.calls.append(("configure_train", server_round))
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        self.calls.append(("aggregate_train", server_round))
        return super().aggregate_train(server_round, replies)

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


class FailsAtTaskEnd(FedAvg, ContinualStrategy):
    """Raises in `on_task_end` (a bug in a user's hook)."""

    def on_task_end(self, server_round, task, arrays, grid):
        raise KeyError("basis")


class ReturnsList(FedAvg, ContinualStrategy):
    """`aggregate_train` returns a list, not Flower's (arrays, metrics) tuple."""

    def aggregate_train(self, server_round, replies):
        return [super().aggregate_train(server_round, replies)[0]]


class OnlyConfigures(Strategy, ContinualStrategy):
    """Forgets every Flower Strategy method but configure_train."""

    def configure_train(self, server_round, arrays, config, grid):
        return []
