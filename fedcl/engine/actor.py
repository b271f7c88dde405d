"""The long-lived Ray actor that runs the ClientApp for the virtual clients pinned to it."""

from __future__ import annotations

import copy
import logging
import traceback
from typing import Any

import numpy as np
import ray
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.message.message import make_message

from fedcl.client.runtime import ClientRuntime, set_runtime
from fedcl.engine.flower_compat import assign_message_id, error_reply, partition_of
from fedcl.imports import load_object
from fedcl.scenario.scenario import Scenario


class ClientActor:
    """Holds the ClientApp, the shared data views and the `Context` of each node it serves.

    A node (virtual client) is always served by the same actor, so whatever its ClientApp keeps in
    `Context.state` — counters, replay buffers, Fisher diagonals — stays here between rounds.
    """

    def __init__(
        self,
        config: dict[str, Any],
        scenario: Scenario,
        x_train: np.ndarray,
        y_train: np.ndarray,
        input_shape: tuple[int, ...],
        num_classes: int,
        run_id: int,
    ) -> None:
        torch.set_num_threads(config["engine"]["torch_threads"])
        if not config["log"]["verbose"]:
            logging.getLogger("flwr").setLevel(logging.WARNING)
        set_runtime(
            ClientRuntime(config, scenario, x_train, y_train, tuple(input_shape), num_classes)
        )
        self.app = load_object(config["client"]["app"], what="client.app")
        self.run_id = run_id
        self.num_partitions = scenario.num_clients
        self.run_config = _flat_scalars(config)
        self.contexts: dict[int, Context] = {}

    def ready(self) -> bool:
        """True once the actor is constructed (used to surface start-up errors early)."""
        return True

    def context(self, node_id: int) -> Context:
        """The persistent Flower context of node `node_id`, created on its first message."""
        if node_id not in self.contexts:
            self.contexts[node_id] = Context(
                run_id=self.run_id,
                node_id=node_id,
                node_config={
                    "partition-id": partition_of(node_id),
                    "num-partitions": self.num_partitions,
                },
                state=RecordDict(),
                run_config=self.run_config,
            )
        return self.contexts[node_id]

    def handle(
        self, batch: list[tuple[Any, int]], contents: dict[int, ray.ObjectRef]
    ) -> list[Message]:
        """Run the ClientApp on each (metadata, content key) in order; return one reply per message.

        `contents` holds each distinct message content once (strategies send one shared RecordDict
        to all sampled nodes); each message gets its own copy, so no handler leaks into the next.
        """
        keys = list(contents)
        shared = dict(zip(keys, ray.get([contents[k] for k in keys]), strict=True))
        replies = []
        for metadata, key in batch:
            message = make_message(metadata, copy.deepcopy(shared[key]))
            try:
                reply = self.app(message, self.context(metadata.dst_node_id))
                assign_message_id(reply)
            except Exception as exc:  # a client's failure becomes a Flower Error reply, not a crash
                reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
                reply = error_reply(message, reason)
            replies.append(reply)
        return replies

    def export_states(self) -> dict[int, RecordDict]:
        """Every node's `Context.state` (for checkpoints)."""
        return {node_id: ctx.state for node_id, ctx in self.contexts.items()}


def _flat_scalars(config: dict[str, Any], prefix: str = "") -> dict[str, bool | float | int | str]:
    """The config as Flower `run_config`: dotted keys, scalar values only."""
    flat: dict[str, bool | float | int | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat_scalars(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
    return flat


RemoteClientActor = ray.remote(ClientActor)
