"""`RayGrid`: a Flower `Grid` whose nodes are virtual clients served by a pool of Ray actors.

Stock Flower strategies talk to it exactly as to Flower's own grids (they only call `get_node_ids`
and `send_and_receive`). Placement is sticky: node k always runs on actor k mod A, so client state
stays on its actor. Each distinct message content is put in the object store once per push, and each
actor gets one call per push with all of its messages.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np
import ray
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedcl.engine.flower_compat import assign_message_id, error_reply, partition_of


class RayGrid(Grid):
    """A Flower Grid over `actors`, serving the virtual clients `node_ids`."""

    def __init__(self, actors: Sequence[ray.actor.ActorHandle], node_ids: Sequence[int], run: Run):
        if not actors:
            raise ValueError("RayGrid needs at least one actor")
        self.actors = list(actors)
        self.node_ids = np.unique(np.asarray(node_ids, dtype=np.int64))  # sorted
        self._run = run
        self._requests: dict[str, Message] = {}  # message id -> message, until its reply is pulled
        self._in_flight: dict[ray.ObjectRef, list[str]] = {}  # actor call -> message ids it carries
        self._replies: dict[str, Message] = {}  # request message id -> reply
        self._abandoned: set[str] = set()  # timed out: their late replies are dropped
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

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Dispatch `messages` to their nodes' actors; return their new message ids."""
        batches: dict[int, list[tuple[object, int]]] = {}
        contents: dict[int, ray.ObjectRef] = {}
        per_actor_contents: dict[int, dict[int, ray.ObjectRef]] = {}
        ids_per_actor: dict[int, list[str]] = {}
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
                contents[key] = ray.put(message.content)
            actor = self.actor_of(node_id)
            batches.setdefault(actor, []).append((message.metadata, key))
            per_actor_contents.setdefault(actor, {})[key] = contents[key]
            ids_per_actor.setdefault(actor, []).append(message_id)
        for actor, batch in batches.items():
            ref = self.actors[actor].handle.remote(batch, per_actor_contents[actor])
            self._in_flight[ref] = ids_per_actor[actor]
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
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Push `messages`, wait up to `timeout` s; return replies in the order of `messages`."""
        message_ids = self.push_messages(messages)
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
                self._requests.pop(message_id, None)
        return replies

    # --- internals ---------------------------------------------------------------------------
    def _collect(self, timeout: float | None, wait_for_one: bool = False) -> None:
        """Move finished calls' replies into `_replies`; an actor crash yields Error replies."""
        if not self._in_flight:
            return
        refs = list(self._in_flight)
        ready, _ = ray.wait(refs, num_returns=1 if wait_for_one else len(refs), timeout=timeout)
        for ref in ready:
            message_ids = self._in_flight.pop(ref)
            replies: list[Message] | None = None
            try:
                replies = ray.get(ref)
            except ray.exceptions.RayError as exc:
                failure = f"actor failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            for i, message_id in enumerate(message_ids):
                if message_id in self._abandoned:
                    self._abandoned.discard(message_id)
                elif replies is not None:
                    self._replies[message_id] = replies[i]
                else:
                    request = self._requests[message_id]
                    self._replies[message_id] = error_reply(request, failure, crashed=True)
