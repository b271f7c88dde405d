"""The public base a strategy is written against: continual hooks, client extensions, queries.

A continual strategy is a Flower `Strategy` that also subclasses `ContinualStrategy`; the round loop
calls its hooks as the timeline unfolds, in addition to Flower's configure/aggregate calls. A hook
may talk to clients through `grid` (e.g. ask for activations with `query_nodes`) and may return new
global arrays. Its client half is a `ClientExtension` the strategy declares: the actors install it
at start-up, so a strategy in a user's module reaches every actor. Stock Flower strategies have no
hooks and run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore import log

if TYPE_CHECKING:
    from torch import nn

# A handler answers one message type on the client, as a Flower ClientApp function does.
Handler = Callable[[Message, Context], Message]
# A train extra adds records to fedcl's train reply when the train config holds its key (e.g.
# Fisher merging sends "fisher-mode" and gets a "fisher" ArrayRecord back). It is called with the
# locally trained model, the client's training inputs and labels of the round, the config and the
# node's context, and returns the records to add under their names.
TrainExtra = Callable[
    ["nn.Module", np.ndarray, np.ndarray, ConfigRecord, Context],
    dict[str, ArrayRecord | MetricRecord | ConfigRecord],
]


@dataclass(frozen=True)
class ClientExtension:
    """The client half of an algorithm: the handlers and train extras its strategy needs.

    `handlers` maps a message type with an action (``"query.<name>"``, or ``"train.<name>"`` for
    a training step of the algorithm's own) to its handler; every other message goes to the run's
    ClientApp. `train_extras` maps a train config key to the extra that answers it (run by
    fedcl's default ClientApp after its training). A
    strategy returns one from `ContinualStrategy.client_extension`; every actor installs it when it
    starts (the functions travel to the actors by Ray's pickling, so they may live in any module
    the actors can import, or in a notebook).
    """

    handlers: Mapping[str, Handler] = field(default_factory=dict)
    train_extras: Mapping[str, TrainExtra] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for message_type in self.handlers:
            category, _, action = message_type.partition(".")
            if category not in ("query", "train", "evaluate") or not action.isidentifier():
                raise ValueError(
                    f"handler '{message_type}' must be named '<query|train|evaluate>.<action>' "
                    "(Flower's message types)"
                )

    def wrap(self, app: ClientApp) -> Callable[[Message, Context], Message]:
        """A ClientApp callable that answers this extension's message types and hands every
        other message to `app` (the user's `app` object is left as it was)."""
        if not self.handlers:
            return app
        handlers = dict(self.handlers)

        def extended(message: Message, context: Context) -> Message:
            handler = handlers.get(message.metadata.message_type)
            return handler(message, context) if handler else app(message, context)

        return extended


def query_nodes(
    grid: Grid,
    node_ids: Iterable[int],
    message_type: str,
    content: RecordDict,
    *,
    label: str,
    timeout: float | None = None,
) -> list[Message]:
    """Send `content` as `message_type` to every node in `node_ids`; return the successful replies
    in node-id order. Failed nodes are logged once each, prefixed by `label` (the strategy)."""
    messages = [
        Message(content=content, message_type=message_type, dst_node_id=node) for node in node_ids
    ]
    replies = sorted(
        grid.send_and_receive(messages, timeout=timeout), key=lambda r: r.metadata.src_node_id
    )
    answered = []
    for reply in replies:
        if reply.has_error():
            node, reason = reply.metadata.src_node_id, reply.error.reason
            log(WARNING, "%s: node %d did not answer %s: %s", label, node, message_type, reason)
        else:
            answered.append(reply)
    return answered


@dataclass(frozen=True)
class ScenarioInfo:
    """What a strategy may legitimately know of the scenario before the run starts.

    No client data and no future events: the number of clients, tasks, classes and rounds, the
    classes of each task, the scenario kind, and the run's seed (to derive its own draws from).
    """

    num_clients: int
    num_tasks: int
    num_classes: int
    rounds: int
    kind: str
    task_classes: tuple[tuple[int, ...], ...]
    seed: int


@dataclass(frozen=True)
class DeletionRequest:
    """A data-deletion request as it reaches a strategy.

    `what` is "samples", "class" or "client"; `node_ids` the Flower nodes it touches; `sample_ids`
    the deleted training sample ids per node; `classes` the deleted class (for "class").
    """

    server_round: int
    what: str
    node_ids: tuple[int, ...]
    sample_ids: Mapping[int, np.ndarray] = field(default_factory=dict)
    classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class DriftEvent:
    """A concept drift as it reaches a strategy: type, parameters, mode, and the nodes it hits."""

    server_round: int
    type: str
    node_ids: tuple[int, ...]
    params: Mapping[str, Any] = field(default_factory=dict)


class ContinualStrategy:
    """Mixin with the hooks the fedcl round loop calls; the defaults do nothing.

    Order within a run: `on_run_start` once; then, for every round r, before training, the events
    of round r in timeline order (per task event: `on_client_task_start` for each of its clients,
    then `on_task_start` if every client starts the task at r; `on_drift`; `on_delete`); then
    Flower's `configure_train` and `aggregate_train`; then `on_client_task_end` for every client
    whose task ends with r (in client order); then `on_task_end` if r ends a global task; then
    evaluation. A hook raising stops the run with a message naming the strategy, hook and round.
    """

    scenario: ScenarioInfo | None = None

    def client_extension(self) -> ClientExtension | None:
        """The client half this strategy needs installed on every actor (None: nothing)."""
        return None

    def on_run_start(self, scenario: ScenarioInfo) -> None:
        """Once, before round 1: what the strategy may know of the scenario (kept as
        `self.scenario` by default)."""
        self.scenario = scenario

    def on_task_start(
        self, server_round: int, task: int, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """Before round `server_round`, where every client starts `task`; may return new arrays."""
        return None

    def on_task_end(
        self, server_round: int, task: int, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """After aggregation in `server_round`, the last round of the global task `task`, before
        evaluation; may return new arrays."""
        return None

    def on_client_task_start(self, server_round: int, node_id: int, task: int) -> None:
        """Before round `server_round`, in which client `node_id` starts `task` (every boundary,
        global or per client)."""
        return None

    def on_client_task_end(self, server_round: int, node_id: int, task: int) -> None:
        """After round `server_round`, client `node_id`'s last round on `task` (it switches task,
        leaves, or the run ends)."""
        return None

    def on_drift(self, drift: DriftEvent, arrays: ArrayRecord, grid: Grid) -> ArrayRecord | None:
        """Before round `drift.server_round`, from which the drift applies; may return arrays."""
        return None

    def on_delete(
        self, deletion: DeletionRequest, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """Before round `deletion.server_round`, from which the data is gone from the clients;
        an unlearning strategy removes its contribution here and may return new arrays."""
        return None
