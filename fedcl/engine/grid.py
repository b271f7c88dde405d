"""`RayGrid`: a Flower `Grid` whose nodes are virtual clients served by a pool of Ray actors.

Stock Flower strategies talk to it exactly as to Flower's own grids (they only call `get_node_ids`
and `send_and_receive`). Placement is sticky: node k always runs on actor k mod A, so client state
stays on its actor. Each distinct message content is put in the object store once per push, and each
actor gets one call per push with all of its messages. With a `SumPlan` (FedAvg-family strategies)
the actors sum their clients' models and send back one sum each (`fedcl.engine.summation`).

With an `ActorRecovery`, a dead actor is replaced, its nodes move to the replacement with their
state, and its unanswered calls are sent again, at most `max_retries` times; after that, their
messages get error replies ("actor died: ...; retried N times").
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
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


@dataclass
class _Call:
    """One actor call in flight, with what it carries, so that it can be sent again."""

    actor: int  # index into RayGrid.actors
    handle: ray.actor.ActorHandle  # the actor it went to
    batch: list[tuple[Any, int]]
    contents: dict[int, ray.ObjectRef]  # each a pickled RecordDict (`pack`)
    plan: SumPlan | None
    message_ids: list[str]
    node_ids: np.ndarray
    rounds: np.ndarray  # the server round of each message (UNKNOWN_ROUND: none named)
    trains: np.ndarray  # bool: train messages
    attempt: int = 0  # how often it has been sent again
    sent_bytes: int = 0  # what one sending of it moves: its contents and inline arguments
    arguments: bytes = b""  # (batch, plan), pickled (`pack`)


class RayGrid(Grid):
    """A Flower Grid over `actors`, serving the virtual clients `node_ids`; with `recovery`, dead
    actors are replaced (in `actors`, in place) and their calls retried."""

    def __init__(
        self,
        actors: Sequence[ray.actor.ActorHandle],
        node_ids: Sequence[int],
        run: Run,
        *,
        recovery: ActorRecovery | None = None,
    ):
        if not actors:
            raise ValueError("RayGrid needs at least one actor")
        self.actors = list(actors)
        self.node_ids = np.unique(np.asarray(node_ids, dtype=np.int64))  # sorted
        self.recovery = recovery
        self._run = run
        self._requests: dict[str, Message] = {}  # message id -> message, until its reply is pulled
        self._in_flight: dict[ray.ObjectRef, _Call] = {}  # actor call -> what it carries
        self._replies: dict[str, Message] = {}  # request message id -> reply
        self._abandoned: set[str] = set()  # timed out: their late replies are dropped
        self._timed_out: list[int] = []  # nodes whose messages timed out, until taken
        self._sums: list[ArraySum] = []  # the actors' sums of summed replies, until taken
        self._traffic = [0, 0]  # bytes sent to and received from the actors, until taken
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
        """Index of the actor that serves node `node_id` (always the same one)."""
        return partition_of(node_id) % len(self.actors)

    def push_messages(
        self, messages: Iterable[Message], *, plan: SumPlan | None = None
    ) -> list[str]:
        """Dispatch `messages` to their nodes' actors; return their new message ids. With `plan`,
        each actor sums the train replies it can (`take_sums`) and replies with stubs."""
        calls: dict[int, _Call] = {}
        contents: dict[int, ray.ObjectRef] = {}
        sizes: dict[int, int] = {}  # content key -> bytes of its pickled form
        rounds: dict[int, int] = {}  # content key -> its server round
        per_actor: dict[int, tuple[list[int], list[int], list[bool]]] = {}  # nodes, rounds, trains
        message_ids = []
        messages = list(messages)
        self._check_known(np.unique([m.metadata.dst_node_id for m in messages]).astype(np.int64))
        for message in messages:
            node_id = message.metadata.dst_node_id
            message_id = assign_message_id(message)
            message_ids.append(message_id)
            self._requests[message_id] = message
            key = id(message.content)
            if key not in contents:
                packed = pack(message.content)
                contents[key] = ray.put(packed)
                sizes[key] = len(packed)
                rounds[key] = round_of(message.content)
            actor = self.actor_of(node_id)
            if actor not in calls:
                calls[actor] = _Call(actor, self.actors[actor], [], {}, plan, [], *_EMPTY)
                per_actor[actor] = ([], [], [])
            call = calls[actor]
            call.batch.append((message.metadata, key))
            call.contents[key] = contents[key]
            call.message_ids.append(message_id)
            nodes, call_rounds, trains = per_actor[actor]
            nodes.append(node_id)
            call_rounds.append(rounds[key])
            trains.append(message.metadata.message_type == MessageType.TRAIN)
        for actor, call in calls.items():
            nodes, call_rounds, trains = per_actor[actor]
            call.arguments = pack((call.batch, call.plan))
            call.sent_bytes = sum(sizes[key] for key in call.contents) + len(call.arguments)
            call.node_ids = np.asarray(nodes, dtype=np.int64)
            call.rounds = np.asarray(call_rounds, dtype=np.int64)
            call.trains = np.asarray(trains, dtype=bool)
            self._submit(call)
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

    def nodes_of(self, actor: int) -> np.ndarray:
        """The node ids actor `actor` serves, ascending."""
        return self.node_ids[partition_of(self.node_ids) % len(self.actors) == actor]

    # --- internals ---------------------------------------------------------------------------
    def _submit(self, call: _Call) -> None:
        ref = call.handle.handle.remote(call.arguments, call.contents)
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
        # An actor's messages time out together (one call): a late sum is dropped with them.
        if total is not None and total.count and call.message_ids[0] not in self._abandoned:
            self._sums.append(total)
        if self.recovery is not None:
            answered = np.fromiter((not r.has_error() for r in replies), bool, len(replies))
            self.recovery.journal.record(call.node_ids, call.rounds, call.trains & answered)
        for message_id, reply in zip(call.message_ids, replies, strict=True):
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


_EMPTY = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, bool))


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
