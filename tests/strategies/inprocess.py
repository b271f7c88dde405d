"""An in-process Flower Grid running fedcl's real ClientApp handlers: strategy tests without Ray.

`InProcessGrid(overrides)` builds the config, dataset and scenario as a run would, installs the
client runtime in this process, and answers messages by calling the ClientApp directly (node ids
are fedcl's: 1000 + client).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid

import fedcl.client.app  # noqa: F401  (registers the continual handlers on the default app)
from fedcl.client.app import app
from fedcl.client.runtime import ClientRuntime, set_runtime
from fedcl.config import load_config, to_container
from fedcl.engine.flower_compat import (
    assign_message_id,
    make_run,
    node_id_of,
    partition_of,
    set_server_identity,
)
from fedcl.models import build_model
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.scenario import build_scenario
from fedcl.seeding import derive_seed


class InProcessGrid(Grid):
    """A Grid whose nodes are fedcl's virtual clients, served in this process, in order."""

    def __init__(self, overrides: Sequence[str]) -> None:
        self.cfg = load_config(None, list(overrides))
        config = to_container(self.cfg)
        self.dataset = load_dataset(self.cfg.dataset.name, seed=self.cfg.seed)
        self.scenario = build_scenario(self.cfg, self.dataset)
        self.runtime = ClientRuntime(
            config,
            self.scenario,
            self.dataset.x_train,
            self.dataset.y_train,
            tuple(self.dataset.input_shape),
            self.dataset.num_classes,
        )
        set_runtime(self.runtime)
        # As an actor does; several intra-op threads on a busy 2-core machine crawl.
        self._threads = torch.get_num_threads()
        torch.set_num_threads(self.cfg.engine.torch_threads)
        set_server_identity(run_id=11)
        self._run = make_run(11)
        self.node_ids = [node_id_of(c) for c in range(self.cfg.clients.num)]
        self.contexts: dict[int, Context] = {}

    def new_model(self):
        """A model of the run's architecture with the run's initial weights."""
        return build_model(
            self.cfg.model.name,
            self.dataset.input_shape,
            self.dataset.num_classes,
            hidden=self.cfg.model.hidden,
            channels=self.cfg.model.channels,
            seed=derive_seed(self.cfg.seed, "init"),
        )

    # --- Grid ----------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Run the ClientApp on each message (on a copy of its content); replies in order."""
        replies = []
        for message in messages:
            assign_message_id(message)
            node_id = message.metadata.dst_node_id
            context = self.contexts.setdefault(
                node_id,
                Context(
                    run_id=11,
                    node_id=node_id,
                    node_config={
                        "partition-id": partition_of(node_id),
                        "num-partitions": len(self.node_ids),
                    },
                    state=RecordDict(),
                    run_config={},
                ),
            )
            # As fedcl's actors do: each handler gets its own copy of the content.
            reply = app(make_message(message.metadata, copy.deepcopy(message.content)), context)
            assign_message_id(reply)
            replies.append(reply)
        return replies

    def close(self) -> None:
        """Uninstall the client runtime from this process; restore torch's thread count."""
        set_runtime(None)
        torch.set_num_threads(self._threads)
