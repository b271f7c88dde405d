"""Faults for tests of actor failure: a strategy that kills a client actor at a chosen round, and a
ClientApp whose client 1 takes its actor's process down on every call.

`KillsActor` is FedAvg (summed on the actors like FedAvg) that, before round `kill_round`'s
training, kills client actor `actor` in one of these ways (`how`):

- ``ray_kill``: `ray.kill` of the actor;
- ``sigkill``: SIGKILL of the actor's worker process;
- ``in_call``: in the middle of the round's call, client `client` SIGKILLs its own process after
  it trained (the actor's clients before it in the call have trained too), once: the file
  `marker` records that it happened;
- ``remove_node``: the Ray node the actor runs on is removed from `CLUSTER` (a
  `ray.cluster_utils.Cluster` the test sets).

With `kill_round=0` it is plain FedAvg: the uninterrupted run to compare with.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import ray
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcl.client import app as default
from fedcl.client.messages import client_of
from fedcl.strategies.base import ClientExtension, ContinualStrategy

DIE_KEY = "test.die-once"  # train config: the marker file of the in-call kill
CLIENT_KEY = "test.die-client"  # train config: the client that kills its process
CLUSTER: Any = None  # the ray.cluster_utils.Cluster of a two-node test


def _die_once(model: Any, x: np.ndarray, y: np.ndarray, config: ConfigRecord, context: Context):
    """Train extra: the chosen client SIGKILLs its own process, unless `marker` says it did."""
    marker = Path(str(config[DIE_KEY]))
    if client_of(context) == int(config[CLIENT_KEY]) and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return {}


def actor_pid(actor: ray.actor.ActorHandle) -> int:
    """The pid of the worker process behind `actor`."""
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def actor_node(actor: ray.actor.ActorHandle) -> str:
    """The id (hex) of the Ray node `actor` runs on."""
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


class KillsActor(FedAvg, ContinualStrategy):
    """FedAvg that kills client actor `actor` at round `kill_round` (see the module docstring)."""

    def __init__(
        self,
        *,
        kill_round: int = 0,
        how: str = "ray_kill",
        actor: int = 0,
        client: int = 0,
        marker: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.kill_round, self.how, self.actor = kill_round, how, actor
        self.client, self.marker = client, marker

    def client_extension(self) -> ClientExtension:
        return ClientExtension(train_extras={DIE_KEY: _die_once})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        if server_round == self.kill_round:
            victim = grid.actors[self.actor]
            if self.how == "ray_kill":
                ray.kill(victim)
            elif self.how == "sigkill":
                os.kill(actor_pid(victim), signal.SIGKILL)
            elif self.how == "in_call":
                config[DIE_KEY], config[CLIENT_KEY] = self.marker, self.client
            elif self.how == "remove_node":
                node_id = actor_node(victim)
                (node,) = [n for n in CLUSTER.worker_nodes if n.node_id == node_id]
                CLUSTER.remove_node(node)
            else:
                raise ValueError(f"unknown way to kill an actor: {self.how}")
        return super().configure_train(server_round, arrays, config, grid)


EXITS = 1  # the client of `exiting_app` that takes its actor's process down
exiting_app = ClientApp()


@exiting_app.train()
def _train_or_exit(msg: Message, context: Context) -> Message:
    """fedcl's default training, except that client `EXITS` ends its process (every time)."""
    if client_of(context) == EXITS:
        os._exit(1)
    return default.train(msg, context)
