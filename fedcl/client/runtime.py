"""The per-actor runtime the ClientApp handlers share: data views, scenario, model recipe.

Each actor process holds one runtime, installed when the actor starts. Flower handlers only receive
`(Message, Context)`, so they reach the shared, read-only parts of the simulation through
`current_runtime()`; per-client state stays in each node's `Context.state`, which never leaves
the actor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedcl.models import model_from_config
from fedcl.npy import values_of
from fedcl.scenario.scenario import ClientView, Scenario

if TYPE_CHECKING:
    from fedcl.strategies.base import TrainExtra


@dataclass(frozen=True)
class ClientRuntime:
    """Read-only simulation context shared by all virtual clients of one actor."""

    config: dict[str, Any]
    scenario: Scenario
    x_train: np.ndarray
    y_train: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int
    # The strategy's train extras (config key -> extra), installed from its ClientExtension.
    train_extras: Mapping[str, TrainExtra] = field(default_factory=dict)
    # One module per actor, reloaded per message: building one per message costs more than the
    # few SGD steps a client takes. Also the last message's decoded arrays.
    _cache: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

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

    def load_model(self, arrays: ArrayRecord) -> nn.Module:
        """The actor's model of the run's architecture, holding `arrays` (the weights a message
        carries). The module is reused by the next message: do not keep it across messages."""
        if "model" not in self._cache:
            self._cache["model"] = self.new_model()
        model = self._cache["model"]
        tensors = self._decoded(arrays)
        loaded = self._cache.get("loaded")
        if loaded is not None and loaded[0] is tensors:
            # The same arrays as the last load (the next client of a round): load_state_dict has
            # checked names and shapes already, so a plain copy per tensor does (~10x cheaper).
            with torch.no_grad():
                torch._foreach_copy_(loaded[1], loaded[2])
            return model
        model.load_state_dict(tensors)
        state = model.state_dict(keep_vars=True)
        self._cache["loaded"] = (tensors, list(state.values()), [tensors[k] for k in state])
        return model

    def _decoded(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """`arrays` as tensors. The clients of one actor call share the same `Array` objects
        (see `own_copy`), so they are decoded once, not once per client."""
        identity = tuple((name, id(array)) for name, array in arrays.items())
        cached = self._cache.get("decoded")
        if cached is not None and cached[0] == identity:
            return cached[2]
        tensors = {
            name: torch.from_numpy(values_of(array).copy()) for name, array in arrays.items()
        }
        # The Array objects are kept with their ids so no id can be reused while cached.
        self._cache["decoded"] = (identity, list(arrays.values()), tensors)
        return tensors

    def task_data(self, client: int, server_round: int, task: int) -> tuple[np.ndarray, np.ndarray]:
        """Client `client`'s inputs and labels of `task` alone as it holds them in `server_round`
        (deletions removed, domain transform and drifts applied); empty for task -1."""
        if task < 0:
            return self.x_train[:0], self.y_train[:0]
        view = self.task_view(client, server_round, task)
        return view.x, view.y

    def task_view(self, client: int, server_round: int, task: int) -> ClientView:
        """Client `client`'s data of `task` alone (no replay, no blurry mix-in) as it holds it in
        `server_round`: deleted samples removed, its current concept applied."""
        ids, tasks = self.scenario.client_ids(client, server_round, task)
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
