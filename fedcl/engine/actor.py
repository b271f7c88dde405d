"""The long-lived Ray actor that runs the ClientApp for the virtual clients pinned to it, and the
factory that starts the run's actors (and any replacement of a dead one) all alike."""

from __future__ import annotations

import dataclasses
import logging
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from flwr.app import Context, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.common import MessageType
from threadpoolctl import threadpool_limits

from fedcl.client.app import StackedArrays, rebuild_state, train_many
from fedcl.client.runtime import ClientRuntime, set_runtime
from fedcl.config import DEFAULT_APP
from fedcl.engine.flower_compat import assign_message_id, error_reply, own_copy, partition_of
from fedcl.engine.packing import pack, unpack
from fedcl.engine.record_codec import encode_records
from fedcl.engine.replies import compiled_kernels, limits_per_node
from fedcl.engine.summation import ArraySum, SumPlan, sum_replies
from fedcl.errors import FedclError
from fedcl.imports import load_object
from fedcl.metrics.system import peak_rss_bytes
from fedcl.scenario.scenario import Scenario
from fedcl.strategies.base import ClientExtension

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorResult:
    """What one `ClientActor.handle` call returns: a reply per message run, in order, the sum of
    the replies summed on the actor (None: nothing was to be summed), the actor process's peak
    resident memory so far (bytes; reported with every call, so measuring it costs no call), the
    positions of the call's messages not run because their nodes' states did not arrive from the
    actor they moved from, and the bytes of the states that did."""

    replies: list[Message]
    total: ArraySum | None
    peak_rss: int
    unrun: list[int] = dataclasses.field(default_factory=list)
    arrived_bytes: int = 0


class ClientActor:
    """Holds the ClientApp, the shared data views and the `Context` of each node it serves.

    At start-up it installs the strategy's client half (`ClientExtension`): its query handlers
    answered beside the ClientApp, its train extras in the runtime the default ClientApp reads.

    Whatever a node's ClientApp keeps in `Context.state` — counters, replay buffers, Fisher
    diagonals — stays with the actor serving the node between rounds; when the grid moves the node
    to another actor (`RayGrid`'s `balance`), the state goes along (`take_states`, then the other
    actor's next call).
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
        extension: ClientExtension | None = None,
    ) -> None:
        torch.set_num_threads(config["engine"]["torch_threads"])
        # numpy's BLAS too: its idle threads spin on cores the other actors are computing on.
        threadpool_limits(limits=config["engine"]["torch_threads"])
        if not config["log"]["verbose"]:
            logging.getLogger("flwr").setLevel(logging.WARNING)
        extension = extension or ClientExtension()
        self.runtime = ClientRuntime(
            config,
            scenario,
            x_train,
            y_train,
            tuple(input_shape),
            num_classes,
            train_extras=dict(extension.train_extras),
        )
        set_runtime(self.runtime)
        self.app = extension.wrap(load_object(config["client"]["app"], what="client.app"))
        # engine.vectorize, resolved on the driver to "on" or "off" (the same for every actor).
        self.default_app = config["client"]["app"] == DEFAULT_APP
        self.vectorized = config["engine"]["vectorize"] == "on" and self.default_app
        self.warned = False
        self.run_id = run_id
        self.num_partitions = scenario.num_clients
        self.run_config = _flat_scalars(config)
        self.contexts: dict[int, Context] = {}

    def ready(self, call_elements: int = 0) -> bool:
        """True once the actor is constructed (used to surface start-up errors early). With
        `call_elements`, about how many model elements one of its calls will sum, it loads the
        compiled sums now if those calls will use them: set-up pays for numba, not round 1."""
        compiled_kernels(call_elements)
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
        self,
        arguments: bytes,
        contents: dict[int, ray.ObjectRef],
        arrivals: dict[int, ray.ObjectRef] | None = None,
    ) -> bytes:
        """Take over the nodes of ``arriving`` ({node: actor it moves from}), each with its
        `Context.state` from that actor's `take_states` result in `arrivals`; then run the
        ClientApp on each (metadata, content key) of ``batch``, in order, but for the messages of
        nodes whose states did not arrive (`ActorResult.unrun`). The packed (`pack`) `arguments`
        are ``(batch, plan, arriving)``. Return, packed, an `ActorResult`: one reply per message
        (with `plan`: and the sum of the train replies it could sum, which became stubs) and
        the process's peak memory.

        `contents` holds each distinct message content once, packed (strategies send one
        shared RecordDict to all sampled nodes); each message gets its own copy (`own_copy`: the
        array bytes are shared, never changed), so no handler leaks into the next.
        """
        batch, plan, arriving = unpack(arguments)
        lost, arrived_bytes = self._take_over(arriving, arrivals or {})
        unrun = [i for i, (metadata, _) in enumerate(batch) if metadata.dst_node_id in lost]
        if unrun:
            batch = [entry for entry in batch if entry[0].dst_node_id not in lost]
        if batch:
            result = self.run_batch(batch, contents, plan)
        else:
            result = ActorResult([], None, peak_rss_bytes())
        return pack(dataclasses.replace(result, unrun=unrun, arrived_bytes=arrived_bytes))

    def _take_over(
        self, arriving: dict[int, int], arrivals: dict[int, ray.ObjectRef]
    ) -> tuple[set[int], int]:
        """Import the states of the nodes `arriving` from the other actors' `take_states`
        results (`arrivals`, by actor); return the nodes whose states could not be had (their
        actor died, or failed, before handing them over) and the bytes of those that arrived."""
        lost: set[int] = set()
        arrived_bytes = 0
        for source, ref in arrivals.items():
            try:
                packed = ray.get(ref)
            except ray.exceptions.RayError:
                lost.update(node for node, s in arriving.items() if s == source)
                continue
            arrived_bytes += len(packed)
            self.import_states(unpack(packed))
        return lost, arrived_bytes

    def run_batch(
        self,
        batch: list[tuple[Any, int]],
        contents: dict[int, ray.ObjectRef],
        plan: SumPlan | None = None,
    ) -> ActorResult:
        """`handle`'s work on unpacked arguments."""
        keys = list(contents)
        packed = ray.get([contents[k] for k in keys])
        shared = {key: unpack(value) for key, value in zip(keys, packed, strict=True)}
        messages = [make_message(metadata, own_copy(shared[key])) for metadata, key in batch]
        replies: dict[int, Message] = {}
        trains = [i for i, m in enumerate(messages) if m.metadata.message_type == MessageType.TRAIN]
        # Even a lone client trains through the vectorized path: a client's arithmetic must not
        # depend on how many others share its actor (same metrics with any number of actors).
        stacked: list[StackedArrays] | None = [] if plan is not None else None
        # Trained on the default ClientApp's own path: vectorized, or, when the replies are
        # summed here, one by one with the weights kept for the sum rather than put in replies.
        if trains and (self.vectorized or (self.default_app and stacked is not None)):
            together = self._train_together([messages[i] for i in trains], trains, stacked)
            replies.update(together)
        for i, message in enumerate(messages):
            if i not in replies:
                replies[i] = self._run_app(message)
        ordered = [replies[i] for i in range(len(messages))]
        total = None
        if plan is not None:
            config, scenario = self.runtime.config, self.runtime.scenario
            limits = limits_per_node(config, scenario, plan.server_round, plan.weight_key)
            ordered, total = sum_replies(messages, ordered, plan, limits, stacked or ())
        return ActorResult(ordered, total, peak_rss_bytes())

    def _run_app(self, message: Message) -> Message:
        """The ClientApp's reply to `message`; a client's failure becomes an Error reply."""
        try:
            reply = self.app(message, self.context(message.metadata.dst_node_id))
            assign_message_id(reply)
        except Exception as exc:  # a client's failure becomes a Flower Error reply, not a crash
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=5)}"
            reply = error_reply(message, reason)
        return reply

    def _train_together(
        self,
        messages: list[Message],
        positions: list[int],
        stacked: list[StackedArrays] | None = None,
    ) -> dict[int, Message]:
        """The default ClientApp's train replies for `messages` (at `positions` of the call's
        messages), from `train_many`; if vectorized training fails as a whole, each is trained
        alone (said once per actor). Given `stacked`, the replies' arrays may be left stacked
        there, positioned among the call's messages."""
        contexts = [self.context(m.metadata.dst_node_id) for m in messages]
        groups: list[StackedArrays] | None = [] if stacked is not None else None
        try:
            replies = train_many(
                messages,
                contexts,
                vectorize=self.vectorized,
                stacked=groups,
                on_failure=self._warn_once,
            )
        except Exception as exc:  # nothing recorded yet: the ClientApp trains each client
            self._warn_once(exc)
            return {}
        for group in groups or ():
            moved = [positions[i] for i in group.positions]
            stacked.append(dataclasses.replace(group, positions=moved))
        together = {}
        for position, reply in zip(positions, replies, strict=True):
            if reply is not None:  # None: the ClientApp runs it, and reports how it fails
                assign_message_id(reply)
                together[position] = reply
        return together

    def _warn_once(self, exc: Exception) -> None:
        """Say, once per actor, that training clients together failed and why."""
        if not self.warned:
            how = "vectorized" if self.vectorized else "batched"
            logger.warning("%s training failed (%s); training clients one by one", how, exc)
            self.warned = True

    def export_states(self) -> dict[int, RecordDict]:
        """Every node's `Context.state` (for checkpoints)."""
        return {node_id: ctx.state for node_id, ctx in self.contexts.items()}

    def export_state_arrays(self) -> dict[str, np.ndarray]:
        """`export_states` encoded as plain arrays (`fedcl.engine.record_codec`), here on the
        actor: the actors encode in parallel, and a checkpoint moves numpy buffers, not records."""
        return encode_records(self.export_states())

    def take_states(self, node_ids: bytes) -> bytes:
        """The `Context.state` of each of the packed (`pack`) `node_ids` that has a context here,
        as a packed {node: state}; this actor then forgets them: the nodes move to another."""
        taken = (self.contexts.pop(int(node_id), None) for node_id in unpack(node_ids))
        return pack({ctx.node_id: ctx.state for ctx in taken if ctx is not None})

    def import_states(self, states: Mapping[int, RecordDict]) -> None:
        """Make `states[node]` the `Context.state` of each node (a resume from a checkpoint);
        the other nodes keep theirs."""
        for node_id, state in states.items():
            self.context(int(node_id)).state = state

    def restore_states(
        self, states: Mapping[int, RecordDict], trained: Mapping[int, Sequence[int]]
    ) -> None:
        """Take over the nodes of a dead actor: `states[node]` becomes the node's state, then the
        default ClientApp's part of it is brought forward over the rounds `trained[node]` the node
        trained in since (`fedcl.client.app.rebuild_state`)."""
        self.import_states(states)
        for node_id, rounds in trained.items():
            rebuild_state(self.context(int(node_id)), rounds)


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


@dataclass(frozen=True)
class ActorFactory:
    """What every client actor of a run is started with, kept so that a dead actor can be
    replaced by one started exactly as the first ones were (same config, same object-store copy
    of the scenario and data, same strategy client half)."""

    config: dict[str, Any]  # the resolved config as plain containers
    data_refs: tuple[ray.ObjectRef, ray.ObjectRef, ray.ObjectRef]  # scenario, x_train, y_train
    input_shape: tuple[int, ...]
    num_classes: int
    run_id: int
    extension: ClientExtension | None = None
    call_elements: int = 0  # about how many model elements one actor call sums (`ready`)

    @classmethod
    def create(
        cls,
        config: dict[str, Any],
        scenario: Scenario,
        x_train: np.ndarray,
        y_train: np.ndarray,
        input_shape: tuple[int, ...],
        num_classes: int,
        run_id: int,
        extension: ClientExtension | None = None,
        call_elements: int = 0,
    ) -> ActorFactory:
        """A factory whose actors share one object-store copy of `scenario` and the data."""
        refs = (ray.put(scenario), ray.put(x_train), ray.put(y_train))
        return cls(config, refs, tuple(input_shape), num_classes, run_id, extension, call_elements)

    def start(self, count: int) -> list[ray.actor.ActorHandle]:
        """Start `count` actors and wait until all are ready.

        Raises `FedclError` (one line) when Ray cannot place them within
        `engine.start_timeout_s` or one fails to start; none of them is left running then.
        """
        engine = self.config["engine"]
        options = {
            "num_cpus": engine["num_cpus_per_actor"],
            "num_gpus": engine["num_gpus_per_actor"],
        }
        actors = [
            RemoteClientActor.options(**options).remote(
                self.config,
                *self.data_refs,
                self.input_shape,
                self.num_classes,
                self.run_id,
                self.extension,
            )
            for _ in range(count)
        ]
        timeout = engine["start_timeout_s"]
        try:
            ray.get([actor.ready.remote(self.call_elements) for actor in actors], timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            kill_actors(actors)
            raise FedclError(
                f"the {count} client actors were not ready within engine.start_timeout_s="
                f"{timeout:g} s: Ray could not place them (other jobs holding CPUs/GPUs? see "
                "`ray status`) or they start slowly"
            ) from None
        except ray.exceptions.RayError as exc:
            kill_actors(actors)
            cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise FedclError(f"client actors failed to start: {cause}") from None
        return actors


def kill_actors(actors: Sequence[ray.actor.ActorHandle]) -> None:
    """Kill `actors` (dead ones included: killing those does nothing)."""
    for actor in actors:
        ray.kill(actor)
