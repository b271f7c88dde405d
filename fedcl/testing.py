"""Test a strategy without Ray: an in-process Flower Grid running the real ClientApp handlers.

`InProcessGrid(overrides, extension=...)` builds the config, dataset and scenario as a run would,
installs the client runtime and the strategy's client half (`ClientExtension`) in this process,
and answers messages by calling the ClientApp directly, node after node (node ids are fedcl's:
1000 + client). Use it in your own tests::

    from fedcl.testing import InProcessGrid

    strategy = MyStrategy()
    grid = InProcessGrid(["clients.num=4", "rounds=2"], extension=strategy.client_extension())
    messages = strategy.configure_train(1, grid.initial_arrays(), ConfigRecord(), grid)
    arrays, metrics = strategy.aggregate_train(1, grid.send_and_receive(messages))
    grid.close()
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid

from fedcl.client.runtime import ClientRuntime, set_runtime
from fedcl.config import load_config, to_container
from fedcl.engine.flower_compat import (
    assign_message_id,
    make_run,
    node_id_of,
    own_copy,
    partition_of,
    set_server_identity,
)
from fedcl.imports import load_object
from fedcl.models import build_model
from fedcl.protocol import NUM_PARTITIONS, PARTITION_ID
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.scenario import build_scenario
from fedcl.seeding import derive_seed
from fedcl.strategies.base import ClientExtension


class InProcessGrid(Grid):
    """A Grid whose nodes are fedcl's virtual clients, served in this process, in order."""

    def __init__(
        self, overrides: Sequence[str] = (), *, extension: ClientExtension | None = None
    ) -> None:
        self.cfg = load_config(None, list(overrides))
        extension = extension or ClientExtension()
        config = to_container(self.cfg)
        self.dataset = load_dataset(
            self.cfg.dataset.name,
            seed=self.cfg.seed,
            root=self.cfg.dataset.root,
            cache_dir=self.cfg.dataset.cache_dir,
            **config["dataset"]["options"],
        )
        self.scenario = build_scenario(self.cfg, self.dataset)
        self.runtime = ClientRuntime(
            config,
            self.scenario,
            self.dataset.x_train,
            self.dataset.y_train,
            tuple(self.dataset.input_shape),
            self.dataset.num_classes,
            train_extras=dict(extension.train_extras),
        )
        set_runtime(self.runtime)
        self.app = extension.wrap(load_object(self.cfg.client.app, what="client.app"))
        # As an actor does; several intra-op threads on a busy 2-core machine crawl.
        self._threads = torch.get_num_threads()
        torch.set_num_threads(self.cfg.engine.torch_threads)
        set_server_identity(run_id=11)
        self._run = make_run(11)
        self.node_ids = [node_id_of(c) for c in range(self.cfg.clients.num)]
        self.contexts: dict[int, Context] = {}
        self._timed_out: list[int] = []

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

    def initial_arrays(self) -> ArrayRecord:
        """The run's initial global arrays (as the driver starts a run with)."""
        return ArrayRecord(self.new_model().state_dict())

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
        """Run the ClientApp on each message (on a copy of its content); replies in order.

        A reply finished more than `timeout` s after the call began is dropped, as a Ray grid
        drops late replies, and its node is kept for `take_timed_out`; the ClientApp still ran
        (its node's state changed), as it does on an actor."""
        deadline = None if timeout is None else time.monotonic() + timeout
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
                        PARTITION_ID: partition_of(node_id),
                        NUM_PARTITIONS: len(self.node_ids),
                    },
                    state=RecordDict(),
                    run_config={},
                ),
            )
            # As fedcl's actors do: each handler gets its own copy of the content.
            reply = self.app(make_message(message.metadata, own_copy(message.content)), context)
            assign_message_id(reply)
            if deadline is not None and time.monotonic() > deadline:
                self._timed_out.append(node_id)
                continue
            replies.append(reply)
        return replies

    def take_timed_out(self) -> list[int]:
        """The nodes whose replies came too late since the last call (they were dropped)."""
        timed_out, self._timed_out = self._timed_out, []
        return timed_out

    def close(self) -> None:
        """Uninstall the client runtime from this process; restore torch's thread count."""
        set_runtime(None)
        torch.set_num_threads(self._threads)
