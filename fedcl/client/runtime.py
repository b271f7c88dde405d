"""The per-actor runtime the ClientApp handlers share: data views, scenario, model recipe.

Each actor process holds one runtime, installed when the actor starts. Flower handlers only receive
`(Message, Context)`, so they reach the shared, read-only parts of the simulation through
`current_runtime()`; per-client state stays in each node's `Context.state`, which never leaves
the actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedcl.models import model_from_config
from fedcl.scenario.scenario import ClientView, Scenario


@dataclass(frozen=True)
class ClientRuntime:
    """Read-only simulation context shared by all virtual clients of one actor."""

    config: dict[str, Any]
    scenario: Scenario
    x_train: np.ndarray
    y_train: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int

    @property
    def seed(self) -> int:
        """The run's seed; derive every draw from it with `fedcl.seeding.derive_seed`."""
        return int(self.config["seed"])

    @property
    def device(self) -> str:
        """Where local training runs: "cuda" when the actor was given a GPU share, else "cpu"."""
        wants_gpu = float(self.config["engine"]["num_gpus_per_actor"]) > 0
        return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"

    def new_model(self) -> nn.Module:
        """A fresh model of the run's architecture (load the server's arrays into it)."""
        return model_from_config(self.config, self.input_shape, self.num_classes)

    def task_view(self, client: int, server_round: int, task: int) -> ClientView:
        """Client `client`'s data of `task` alone (no replay, no blurry mix-in) as it holds it in
        `server_round`: deleted samples removed, its current concept applied."""
        ids = self.scenario.train_indices(client, task)
        ids = ids[~self.scenario.deleted(ids, server_round)]
        tasks = np.full(len(ids), task, dtype=np.int64)
        concept = self.scenario.concept(client, server_round)
        return self.scenario.view(self.x_train, self.y_train, ids, tasks, concept)

    def client_view(
        self,
        client: int,
        server_round: int,
        extra_ids: np.ndarray | None = None,
        extra_tasks: np.ndarray | None = None,
    ) -> ClientView:
        """What client `client` may train on in `server_round` (its current task, deletions
        removed, under its current concept), plus `extra_ids` of `extra_tasks` (e.g. replay)."""
        ids, tasks = self.scenario.client_ids(client, server_round)
        if extra_ids is not None and len(extra_ids):
            ids, tasks = np.concatenate([ids, extra_ids]), np.concatenate([tasks, extra_tasks])
        concept = self.scenario.concept(client, server_round)
        return self.scenario.view(self.x_train, self.y_train, ids, tasks, concept)


_current: ClientRuntime | None = None


def set_runtime(runtime: ClientRuntime | None) -> None:
    """Install the runtime of this process (done by the actor when it starts)."""
    global _current
    _current = runtime


def current_runtime() -> ClientRuntime:
    """The runtime of this actor process; raises if called outside a fedcl actor."""
    if _current is None:
        raise RuntimeError(
            "no fedcl client runtime in this process: handlers run inside fedcl actors"
        )
    return _current
