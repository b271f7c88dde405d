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
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
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
    # True when `on_delete` removes a deleted contribution exactly: the state afterwards equals
    # one never given the data (what `unlearning.method=native` requires).
    exact_deletion: bool = False

    def state_dict(self) -> RecordDict:
        """The strategy's state as plain Flower records, for checkpoints: what `load_state_dict`
        needs to continue, on a strategy built from the same config, exactly where this one is.

        The default (`attribute_state`) takes every instance attribute that is None, a scalar, a
        string, a numpy array, an ArrayRecord, or a list or dict of those, except `scenario`
        (given again by `on_run_start`) and callables (constructor arguments). Override both
        methods when the state holds anything else; raise NotImplementedError (with the reason)
        when it cannot be saved: checkpoints then say so, and a resume is refused.
        """
        return attribute_state(self, exclude=("scenario",))

    def load_state_dict(self, state: RecordDict) -> None:
        """Take back the state `state_dict` returned (called after `on_run_start`, before the
        first resumed round)."""
        load_attribute_state(self, state)

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


_ATTRIBUTES = "attributes"  # ConfigRecord: scalar and scalar-list attributes
_KINDS = "attribute-kinds"  # ConfigRecord: how each other attribute is stored
_ARRAYS = "attribute."  # ArrayRecord per array-valued attribute: "attribute.<name>"
_SCALARS = (bool, int, float, str, bytes)


def _plain(value: Any) -> Any:
    """A numpy scalar as its Python value; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _is_scalar_list(value: Any) -> bool:
    items = [_plain(v) for v in value]
    return len({type(v) for v in items}) <= 1 and all(isinstance(v, _SCALARS) for v in items)


def attribute_state(obj: Any, exclude: Iterable[str] = ()) -> RecordDict:
    """`obj`'s instance attributes as plain records (arrays and scalars, no pickled objects).

    Takes None, scalars, strings, bytes, numpy arrays, ArrayRecords, lists or tuples of scalars
    or of arrays, and dicts with string keys of arrays or of scalars; skips callables and the
    names in `exclude`. Raises NotImplementedError naming the first attribute of another type.
    Stock Flower strategies (FedAvg, FedAdam's moments, FedAvgM's momentum, ...) are saved this
    way; `load_attribute_state` sets the attributes back.
    """
    scalars: dict[str, Any] = {}
    kinds: dict[str, str] = {}
    state = RecordDict()
    skipped = set(exclude)
    for name, value in vars(obj).items():
        value = _plain(value)
        if name in skipped or (callable(value) and not isinstance(value, ArrayRecord)):
            continue
        if value is None:
            kinds[name] = "none"
        elif isinstance(value, _SCALARS):
            scalars[name] = value
        elif isinstance(value, list | tuple) and _is_scalar_list(value):
            scalars[name] = [_plain(v) for v in value]
            kinds[name] = type(value).__name__
        elif isinstance(value, np.ndarray):
            state[_ARRAYS + name] = ArrayRecord({"value": Array(value)})
            kinds[name] = "ndarray"
        elif isinstance(value, ArrayRecord):
            state[_ARRAYS + name] = ArrayRecord(dict(value.items()))
            kinds[name] = "ArrayRecord"
        elif isinstance(value, list | tuple) and all(isinstance(v, np.ndarray) for v in value):
            state[_ARRAYS + name] = ArrayRecord({str(i): Array(v) for i, v in enumerate(value)})
            kinds[name] = f"ndarray-{type(value).__name__}"
        elif (
            isinstance(value, dict)
            and all(isinstance(k, str) for k in value)
            and all(isinstance(v, np.ndarray) for v in value.values())
        ):
            state[_ARRAYS + name] = ArrayRecord({k: Array(v) for k, v in value.items()})
            kinds[name] = "ndarray-dict"
        elif (
            isinstance(value, dict)
            and all(isinstance(k, str) for k in value)
            and all(
                isinstance(_plain(v), _SCALARS) or (isinstance(v, list) and _is_scalar_list(v))
                for v in value.values()
            )
        ):
            state[_ARRAYS + name] = ConfigRecord(
                {
                    k: [_plain(i) for i in v] if isinstance(v, list) else _plain(v)
                    for k, v in value.items()
                }
            )
            kinds[name] = "scalar-dict"
        else:
            raise NotImplementedError(
                f"{type(obj).__name__}.{name} holds a {type(value).__name__}, which a checkpoint "
                "cannot store as arrays or scalars; give the strategy state_dict() and "
                "load_state_dict()"
            )
    state[_ATTRIBUTES] = ConfigRecord(scalars)
    state[_KINDS] = ConfigRecord(kinds)
    return state


def load_attribute_state(obj: Any, state: RecordDict) -> None:
    """Set the attributes `attribute_state` took back on `obj` (arrays as numpy copies)."""
    for name, value in state[_ATTRIBUTES].items():
        setattr(obj, name, value)
    for name, kind in state[_KINDS].items():
        if kind == "none":
            setattr(obj, name, None)
        elif kind == "tuple":
            setattr(obj, name, tuple(state[_ATTRIBUTES][name]))
        elif kind == "list":
            continue
        elif kind == "scalar-dict":
            setattr(obj, name, dict(state[_ARRAYS + name].items()))
        elif kind == "ArrayRecord":
            setattr(obj, name, ArrayRecord(dict(state[_ARRAYS + name].items())))
        else:
            arrays = {key: array.numpy() for key, array in state[_ARRAYS + name].items()}
            if kind == "ndarray":
                setattr(obj, name, arrays["value"])
            elif kind == "ndarray-dict":
                setattr(obj, name, arrays)
            else:  # ndarray-list, ndarray-tuple
                values = list(arrays.values())
                setattr(obj, name, tuple(values) if kind == "ndarray-tuple" else values)
