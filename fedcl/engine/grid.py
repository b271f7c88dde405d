"""`RayGrid`: a Flower `Grid` whose nodes are virtual clients served by a pool of Ray actors.

Stock Flower strategies talk to it exactly as to Flower's own grids (they only call `get_node_ids`
and `send_and_receive`). Each distinct message content is put in the object store once per push,
and each actor gets one call per push with all of its messages. With a `SumPlan` (FedAvg-family
strategies) the actors sum their clients' models and send back one sum each
(`fedcl.engine.summation`).

A node starts on actor (its partition id) mod A; its `Context` stays on the actor that serves it.
With `balance`, a push whose messages fall unevenly on the actors moves nodes, each with its
`Context.state`, from the busiest actors to the idlest until no actor has more than one message
over another: a round lasts as long as its busiest actor. The busy actor hands the states over
(`take_states`) while the idle one's call is on its way, which fetches them itself. Should the
busy one die first, the idle one leaves those messages aside; with a recovery, the nodes get
their states there as a replacement would (`ActorRecovery.restore_moved`) and run again, else
their messages fail.

With an `ActorRecovery`, a dead actor is replaced, its nodes move to the replacement with their
state, and its unanswered calls are sent again, at most `max_retries` times; after that, their
messages get error replies ("actor died: ...; retried N times").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from flwr.app import Message, RecordDict
from flwr.common import MessageType
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedcl.engine.flower_compat import assign_message_id, error_reply, partition_of
from fedcl.engine.packing import pack, unpack
from fedcl.engine.summation import ArraySum, SumPlan
from fedcl.errors import FedclError
from fedcl.protocol import SERVER_ROUND

if TYPE_CHECKING:
    from fedcl.engine.actor import ActorResult
    from fedcl.engine.recovery import ActorRecovery

UNKNOWN_ROUND = int(np.iinfo(np.int64).max)  # a message without a round: after any checkpoint

# How a call reports that its actor is gone (killed, its node lost, out of memory), as opposed
# to an exception raised by the actor's code.
ACTOR_LOST: tuple[type[Exception], ...] = (
    ray.exceptions.RayActorError,
    ray.exceptions.OutOfMemoryError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
)


def _no_messages() -> np.ndarray:
    return np.zeros(0, np.int64)


@dataclass
class _Call:
    """One actor call in flight, with what it carries, so that it can be sent again."""

    actor: int  # index into RayGrid.actors
    handle: ray.actor.ActorHandle  # the actor it went to
    batch: list[tuple[Any, int]]
    contents: dict[int, ray.ObjectRef]  # each a pickled RecordDict (`pack`)
    plan: SumPlan | None
    arriving: dict[int, int]  # node -> the actor it moves from in this push
    arrivals: dict[int, ray.ObjectRef]  # that actor -> its `take_states` result
    content_bytes: dict[int, int]  # content key -> bytes of its pickled form
    message_ids: list[str]
    # Set by `RayGrid._send`: each message's node, server round (UNKNOWN_ROUND: none named),
    # and whether it is a train message.
    node_ids: np.ndarray = dataclasses.field(default_factory=_no_messages)
    rounds: np.ndarray = dataclasses.field(default_factory=_no_messages)
    trains: np.ndarray = dataclasses.field(default_factory=_no_messages)
    attempt: int = 0  # how often it has been sent again
    sent_bytes: int = 0  # what one sending of it moves: its contents and inline arguments
    arguments: bytes = b""  # (batch, plan, arriving), pickled (`pack`)


class RayGrid(Grid):
    """A Flower Grid over `actors`, serving the virtual clients `node_ids`; with `recovery`, dead
    actors are replaced (in `actors`, in place) and their calls retried; with `balance`, each
    push's messages are spread evenly over the actors (module docstring)."""

    def __init__(
        self,
        actors: Sequence[ray.actor.ActorHandle],
        node_ids: Sequence[int],
        run: Run,
        *,
        recovery: ActorRecovery | None = None,
        balance: bool = False,
    ):
        if not actors:
            raise ValueError("RayGrid needs at least one actor")
        self.actors = list(actors)
        self.node_ids = np.unique(np.asarray(node_ids, dtype=np.int64))  # sorted
        self.recovery = recovery
        self.balance = balance
        # The actor serving each of `node_ids` (same order); `balance` changes it.
        self._placement = (partition_of(self.node_ids) % len(self.actors)).astype(np.int32)
        self._run = run
        self._requests: dict[str, Message] = {}  # message id -> message, until its reply is pulled
        self._in_flight: dict[ray.ObjectRef, _Call] = {}  # actor call -> what it carries
        self._replies: dict[str, Message] = {}  # request message id -> reply
        self._abandoned: set[str] = set()  # timed out: their late replies are dropped
        self._timed_out: list[int] = []  # nodes whose messages timed out, until taken
        self._sums: list[ArraySum] = []  # the actors' sums of summed replies, until taken
        self._traffic = [0, 0]  # bytes sent to and received from the actors, until taken
        self._loads = np.zeros(len(self.actors), np.int64)  # messages per actor, until taken
        # Each actor slot's peak resident memory (bytes), as its latest reply reported it.
        self.actor_peak_rss = [0] * len(self.actors)
        self._available = self.node_ids

    # --- Flower's Grid interface -------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """The nodes online now (all registered nodes unless `set_available` narrowed them)."""
        return self._available.tolist()

    def set_available(self, node_ids: Sequence[int] | np.ndarray) -> None:
        """Let only `node_ids` be online (sampled by strategies) until the next call. Checked
        with array operations: a million nodes may be online."""
        ids = np.unique(np.asarray(node_ids, dtype=np.int64))
        self._check_known(ids)
        self._available = ids

    def _check_known(self, ids: np.ndarray) -> None:
        """Raise ValueError if some of the sorted `ids` is not a node of this grid."""
        at = np.minimum(np.searchsorted(self.node_ids, ids), len(self.node_ids) - 1)
        unknown = ids[self.node_ids[at] != ids]
        if len(unknown):
            raise ValueError(f"unknown node ids {unknown[:3].tolist()}")

    def actor_of(self, node_id: int) -> int:
        """Index of the actor that serves node `node_id` now (and holds its `Context`)."""
        return int(self._actors_of(np.asarray(node_id)))

    def _actors_of(self, node_ids: np.ndarray) -> np.ndarray:
        """The actor serving each of the known `node_ids` now."""
        return self._placement[np.searchsorted(self.node_ids, node_ids)]

    def push_messages(
        self, messages: Iterable[Message], *, plan: SumPlan | None = None
    ) -> list[str]:
        """Dispatch `messages` to their nodes' actors; return their new message ids. With `plan`,
        each actor sums the train replies it can (`take_sums`) and replies with stubs."""
        messages = list(messages)
        destinations = np.fromiter(
            (m.metadata.dst_node_id for m in messages), np.int64, len(messages)
        )
        self._check_known(np.unique(destinations))
        actors = self._actors_of(destinations)
        moving = self._start_moves(destinations, actors) if self.balance else {}
        contents: dict[int, ray.ObjectRef] = {}
        sizes: dict[int, int] = {}  # content key -> bytes of its pickled form
        rounds: dict[int, int] = {}  # content key -> its server round
        keys, message_ids = [], []
        for message in messages:
            message_id = assign_message_id(message)
            message_ids.append(message_id)
            self._requests[message_id] = message
            key = id(message.content)
            if key not in contents:
                packed = pack(message.content)
                contents[key] = ray.put(packed)
                sizes[key] = len(packed)
                rounds[key] = round_of(message.content)
            keys.append(key)
        calls: dict[int, _Call] = {}
        for message, message_id, key, actor in zip(
            messages, message_ids, keys, actors.tolist(), strict=True
        ):
            if actor not in calls:
                calls[actor] = _Call(actor, self.actors[actor], [], {}, plan, {}, {}, {}, [])
            call = calls[actor]
            call.batch.append((message.metadata, key))
            call.contents[key] = contents[key]
            call.content_bytes[key] = sizes[key]
            call.message_ids.append(message_id)
        for source, (ref, moves) in moving.items():
            for node, destination in moves.items():
                calls[destination].arriving[node] = source
                calls[destination].arrivals[source] = ref
        for call in calls.values():
            self._send(call, [rounds[key] for _, key in call.batch])
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies that have arrived for `message_ids` (each reply is returned once)."""
        self._collect(timeout=0)
        replies = []
        for message_id in message_ids:
            if message_id in self._replies:
                replies.append(self._replies.pop(message_id))
                del self._requests[message_id]
        return replies

    def send_and_receive(
        self,
        messages: Iterable[Message],
        *,
        timeout: float | None = None,
        plan: SumPlan | None = None,
    ) -> list[Message]:
        """Push `messages`, wait up to `timeout` s; return replies in the order of `messages`.
        Nodes that did not answer in time are kept for `take_timed_out`."""
        message_ids = self.push_messages(messages, plan=plan)
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(m not in self._replies for m in message_ids) and self._in_flight:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                break
            self._collect(timeout=remaining, wait_for_one=True)
        replies = self.pull_messages(message_ids)
        answered = {reply.metadata.reply_to_message_id for reply in replies}
        for message_id in message_ids:
            if message_id not in answered:  # timed out, as Flower's grids drop late replies
                self._abandoned.add(message_id)
                request = self._requests.pop(message_id, None)
                if request is not None:
                    self._timed_out.append(request.metadata.dst_node_id)
        return replies

    def take_timed_out(self) -> list[int]:
        """The nodes whose messages timed out since the last call (their replies were dropped)."""
        timed_out, self._timed_out = self._timed_out, []
        return timed_out

    def take_sums(self) -> list[ArraySum]:
        """The actors' sums of the replies they summed since the last call, in arrival order."""
        sums, self._sums = self._sums, []
        return sums

    def take_traffic(self) -> tuple[int, int]:
        """(bytes sent to the actors, bytes received from them) since the last call: the lengths
        of the pickled bytes that crossed (`fedcl.engine.packing`, `fedcl.metrics.system`), each
        call's message contents and arguments, each call's result."""
        traffic, self._traffic = tuple(self._traffic), [0, 0]
        return traffic  # type: ignore[return-value]

    def take_replacements(self) -> list[dict[str, Any]]:
        """A report of each actor replaced since the last call (`ActorRecovery.replace`)."""
        return self.recovery.take_reports() if self.recovery is not None else []

    def take_loads(self) -> list[int]:
        """How many messages each actor was sent since the last call (its load)."""
        loads, self._loads = self._loads.tolist(), np.zeros(len(self.actors), np.int64)
        return loads

    def import_states(self, states: Mapping[int, RecordDict]) -> None:
        """Make `states[node]` the `Context.state` of each node, on the actor that serves it (a
        resume from a checkpoint); the other nodes keep theirs."""
        nodes = np.fromiter(states, np.int64, len(states))
        self._check_known(np.unique(nodes))
        actors = self._actors_of(nodes)
        per_actor: dict[int, dict[int, RecordDict]] = {}
        for node, actor in zip(nodes.tolist(), actors.tolist(), strict=True):
            per_actor.setdefault(actor, {})[node] = states[node]
        ray.get([self.actors[a].import_states.remote(s) for a, s in per_actor.items()])

    def nodes_of(self, actor: int) -> np.ndarray:
        """The node ids actor `actor` serves, ascending."""
        return self.node_ids[self._placement == actor]

    # --- internals ---------------------------------------------------------------------------
    def _start_moves(
        self, destinations: np.ndarray, actors: np.ndarray
    ) -> dict[int, tuple[ray.ObjectRef, dict[int, int]]]:
        """Move the nodes `balanced_moves` picks: in `actors` (changed in place) and the
        placement; ask each source actor for their states (`take_states`). Return source actor
        -> (that call, {node: destination actor}). Nothing while calls are in flight: states
        are taken from idle actors, not from one whose earlier (perhaps timed-out) call runs."""
        if self._in_flight or len(self.actors) < 2:
            return {}
        per_source: dict[int, dict[int, int]] = {}
        for node, destination in balanced_moves(destinations, actors, len(self.actors)).items():
            moved = destinations == node
            per_source.setdefault(int(actors[moved][0]), {})[node] = destination
            actors[moved] = destination
            self._placement[np.searchsorted(self.node_ids, node)] = destination
        moving = {}
        for source, moves in per_source.items():
            request = pack(list(moves))
            self._traffic[0] += len(request)
            moving[source] = (self.actors[source].take_states.remote(request), moves)
        return moving

    def _send(self, call: _Call, rounds: list[int]) -> None:
        """Fill in `call`'s arguments and per-message arrays (`rounds`: each message's server
        round) and submit it."""
        call.arguments = pack((call.batch, call.plan, call.arriving))
        call.sent_bytes = sum(call.content_bytes.values()) + len(call.arguments)
        call.node_ids = np.fromiter((m.dst_node_id for m, _ in call.batch), np.int64)
        call.rounds = np.asarray(rounds, dtype=np.int64)
        call.trains = np.fromiter(
            (m.message_type == MessageType.TRAIN for m, _ in call.batch), bool, len(call.batch)
        )
        self._loads[call.actor] += len(call.batch)
        self._submit(call)

    def _retry_unrun(self, call: _Call, unrun: list[int]) -> None:
        """The messages at `unrun` in `call` were not run: their nodes' states never arrived from
        the actor they were moving from, which died. With the recovery, the nodes get their
        states as that actor's replacement would (`ActorRecovery.restore_moved`) and the messages
        run again on the same actor; without, they fail."""
        keys = {key for _, key in (call.batch[p] for p in unrun)}
        again = _Call(
            call.actor,
            self.actors[call.actor],
            [call.batch[p] for p in unrun],
            {key: call.contents[key] for key in keys},
            call.plan,
            {},
            {},
            {key: call.content_bytes[key] for key in keys},
            [call.message_ids[p] for p in unrun],
        )
        nodes = call.node_ids[unrun]
        sources = sorted({call.arriving[int(node)] for node in nodes})
        if self.recovery is None:
            self._fail(
                again, f"actor failed: actor {sources[0]}, which held the client's state, died"
            )
            return
        try:
            for source in sources:
                mine = np.asarray([n for n in nodes.tolist() if call.arriving[n] == source])
                self.recovery.restore_moved(again.handle, call.actor, mine, source)
        except ray.exceptions.RayError as exc:
            self._fail(again, f"actor failed: {type(exc).__name__}: {_first_line(exc)}")
            return
        self._send(again, call.rounds[unrun].tolist())

    def _submit(self, call: _Call) -> None:
        ref = call.handle.handle.remote(call.arguments, call.contents, call.arrivals)
        self._in_flight[ref] = call
        self._traffic[0] += call.sent_bytes

    def _collect(self, timeout: float | None, wait_for_one: bool = False) -> None:
        """Move finished calls' replies into `_replies`. A call whose actor died is retried on a
        replacement (with `recovery`); any other failure of a call yields Error replies."""
        if not self._in_flight:
            return
        refs = list(self._in_flight)
        ready, _ = ray.wait(refs, num_returns=1 if wait_for_one else len(refs), timeout=timeout)
        for ref in ready:
            call = self._in_flight.pop(ref)
            try:
                packed = ray.get(ref)
            except ACTOR_LOST as exc:
                self._actor_lost(call, _death_cause(exc))
                continue
            except ray.exceptions.RayError as exc:
                self._fail(call, f"actor failed: {type(exc).__name__}: {_first_line(exc)}")
                continue
            self._traffic[1] += len(packed)
            self._deliver(call, unpack(packed))

    def _deliver(self, call: _Call, result: ActorResult) -> None:
        replies, total = result.replies, result.total
        self.actor_peak_rss[call.actor] = result.peak_rss
        # The moved states came from their actor through the driver (Ray keeps small results
        # with their caller) to this one.
        self._traffic[0] += result.arrived_bytes
        self._traffic[1] += result.arrived_bytes
        # An actor's messages time out together (one call): a late sum is dropped with them.
        if total is not None and total.count and call.message_ids[0] not in self._abandoned:
            self._sums.append(total)
        run = np.ones(len(call.batch), bool)
        if result.unrun:
            run[result.unrun] = False
            self._retry_unrun(call, result.unrun)
        if self.recovery is not None:
            answered = np.fromiter((not r.has_error() for r in replies), bool, len(replies))
            self.recovery.journal.record(
                call.node_ids[run], call.rounds[run], call.trains[run] & answered
            )
        message_ids = [m for m, ran in zip(call.message_ids, run, strict=True) if ran]
        for message_id, reply in zip(message_ids, replies, strict=True):
            if message_id in self._abandoned:
                self._abandoned.discard(message_id)
            else:
                self._replies[message_id] = reply

    def _fail(self, call: _Call, reason: str) -> None:
        """Error replies for the call's messages (those not abandoned at a timeout)."""
        for message_id in call.message_ids:
            if message_id in self._abandoned:
                self._abandoned.discard(message_id)
            else:
                request = self._requests[message_id]
                self._replies[message_id] = error_reply(request, reason, crashed=True)

    def _actor_lost(self, call: _Call, cause: str) -> None:
        """The actor of `call` is gone: replace it (once, whichever of its calls tells first)
        and send the call again, or fail its messages past `max_retries`."""
        if self.recovery is None:
            self._fail(call, f"actor failed: {cause}")
            return
        abandoned = all(message_id in self._abandoned for message_id in call.message_ids)
        resend = not abandoned and call.attempt < self.recovery.max_retries
        if call.handle is self.actors[call.actor]:
            try:
                self.actors[call.actor] = self.recovery.replace(
                    call.handle,
                    call.actor,
                    self.nodes_of(call.actor),
                    cause,
                    attempt=call.attempt,
                    resent=resend,
                )
            except (FedclError, ray.exceptions.RayError) as exc:
                why = f"{type(exc).__name__}: {_first_line(exc)}"
                self._fail(call, f"actor died: {cause}; no replacement could be started: {why}")
                return
        if resend:
            handle = self.actors[call.actor]
            self._submit(dataclasses.replace(call, handle=handle, attempt=call.attempt + 1))
        elif abandoned:
            self._abandoned.difference_update(call.message_ids)
        else:
            times = "time" if call.attempt == 1 else "times"
            self._fail(call, f"actor died: {cause}; retried {call.attempt} {times}")


def balanced_moves(nodes: np.ndarray, actors: np.ndarray, num_actors: int) -> dict[int, int]:
    """Which nodes to move to which actor ({node: actor}) so that no actor gets more than one
    message over another: message i goes to node `nodes[i]`, now served by `actors[i]`. A node
    moves with all its messages; the fewest messages move, and of an actor's nodes those with the
    highest ids go first (the same push always gives the same moves)."""
    unique, first, counts = np.unique(nodes, return_index=True, return_counts=True)
    owners = actors[first]
    loads = np.bincount(actors, minlength=num_actors)
    base, extra = divmod(int(loads.sum()), num_actors)
    targets = np.full(num_actors, base)
    targets[np.argsort(-loads, kind="stable")[:extra]] += 1  # the busiest keep the remainder
    surplus = loads - targets
    moves: dict[int, int] = {}
    for source in np.flatnonzero(surplus > 0):
        mine = np.flatnonzero(owners == source)[::-1]
        for node, count in zip(unique[mine].tolist(), counts[mine].tolist(), strict=True):
            if surplus[source] <= 0:
                break
            destination = int(np.argmin(surplus))
            if count > surplus[source] or count > -surplus[destination]:
                continue
            moves[node] = destination
            surplus[source] -= count
            surplus[destination] += count
    return moves


def round_of(content: RecordDict) -> int:
    """The server round a message's content belongs to (`SERVER_ROUND` of its config records);
    `UNKNOWN_ROUND` when it names none."""
    for record in content.config_records.values():
        if SERVER_ROUND in record:
            return int(record[SERVER_ROUND])
    return UNKNOWN_ROUND


_BECAUSE = "The actor is dead because "  # how Ray's ActorDiedError words a known cause


def _death_cause(exc: BaseException) -> str:
    """Why an actor is gone, in a few words ("ActorDiedError: it was killed by `ray.kill`"):
    the first sentence of the cause Ray gives after its generic first line and the actor's
    details (tab-indented), else its first line."""
    lines = str(exc).strip().splitlines()
    causes = [line for line in lines[1:] if line.strip() and not line.startswith("\t")]
    reason = causes[-1] if causes else _first_line(exc)
    reason = reason.removeprefix(_BECAUSE).split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {reason}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
