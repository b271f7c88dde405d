"""Replacing dead client actors, and giving their clients their state back.

When an actor dies (its process killed, its node lost, out of memory), `RayGrid` asks
`ActorRecovery` for a replacement: an actor started as the first ones were (`ActorFactory`), on
whichever node Ray finds room, holding the state of every node pinned to the dead actor. The grid
then sends the dead actor's unanswered calls to it again, at most `engine.max_retries` times.

A moved node's `Context.state` comes from the first of these that applies:

1. *empty*: the node never answered a message (in this run), so it had no state;
2. *checkpoint*: the latest good checkpoint holds it, because the node answered no message after
   that checkpoint's round;
3. *rebuilt* (the default ClientApp only): its state is a function of the rounds it trained in,
   which the `ClientJournal` saw; the checkpoint's copy (or an empty state) is brought forward
   over the rounds since (`fedcl.client.app.rebuild_state`). Keys that other code keeps in the
   state (a strategy's client half) cannot be rebuilt: they are dropped and reported as lost;
4. *lost*: none of the above; the node restarts with an empty state, and the report says so.

Client training is deterministic, so in cases 1 to 3 the retried work gives the replies the dead
actor would have given.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from flwr.app import RecordDict

from fedcl.client.app import REBUILT_KEYS
from fedcl.config import DEFAULT_APP
from fedcl.engine.actor import ActorFactory, kill_actors
from fedcl.engine.checkpoint import latest_checkpoint
from fedcl.engine.flower_compat import partition_of

logger = logging.getLogger(__name__)

MAX_LISTED = 1000  # a report lists at most this many moved clients (it always counts them)


def _counts(plan: RestorePlan) -> str:
    """How the plan's states were had, for a log line ("2 rebuilt, 1 empty")."""
    return ", ".join(f"{count} {how}" for how, count in plan.how.items() if count)


class ClientJournal:
    """What the driver saw each node's actor finish: the last round of any message a node
    answered, and the rounds in which it trained (answered a train message without error).

    That is enough to tell whether a checkpoint still holds a node's state and to rebuild the
    default ClientApp's state. Rounds up to `starts_after` (the checkpoint a resumed run started
    from) are not in the journal.
    """

    def __init__(self, node_ids: np.ndarray, starts_after: int = 0) -> None:
        self.node_ids = np.asarray(node_ids, dtype=np.int64)  # sorted
        self.starts_after = starts_after
        self.last_round = np.zeros(len(self.node_ids), dtype=np.int64)  # 0: none answered
        self._trained: list[tuple[int, np.ndarray]] = []  # (round, node ids that trained in it)

    def record(self, node_ids: np.ndarray, rounds: np.ndarray, trained: np.ndarray) -> None:
        """Nodes `node_ids` answered messages of `rounds`; `trained` marks the train messages
        they answered without error."""
        np.maximum.at(self.last_round, np.searchsorted(self.node_ids, node_ids), rounds)
        for server_round in np.unique(rounds[trained]).tolist():
            self._trained.append((server_round, node_ids[trained & (rounds == server_round)]))

    def last_rounds(self, node_ids: np.ndarray) -> np.ndarray:
        """The last round of a message each of `node_ids` answered (0: none)."""
        return self.last_round[np.searchsorted(self.node_ids, node_ids)]

    def trained_after(self, node_ids: np.ndarray, after: int) -> dict[int, list[int]]:
        """For each of `node_ids` that trained after round `after`: those rounds, ascending."""
        rounds: dict[int, list[int]] = {}
        for server_round, nodes in self._trained:
            if server_round > after:
                for node in nodes[np.isin(nodes, node_ids)].tolist():
                    rounds.setdefault(node, []).append(server_round)
        return {node: sorted(found) for node, found in rounds.items()}


@dataclass
class RestorePlan:
    """The states a replacement actor is given, and how each moved node's state was found."""

    states: dict[int, RecordDict] = field(default_factory=dict)  # node -> its state (or base)
    trained: dict[int, list[int]] = field(default_factory=dict)  # node -> rounds to rebuild over
    how: dict[str, int] = field(
        default_factory=lambda: {"empty": 0, "checkpoint": 0, "rebuilt": 0, "lost": 0}
    )
    lost: list[int] = field(default_factory=list)  # nodes restarted with an empty state
    lost_keys: set[str] = field(default_factory=set)  # state keys dropped from rebuilt nodes
    checkpoint_round: int | None = None


class ActorRecovery:
    """Starts replacements for dead client actors and restores their nodes' states (see the
    module docstring); keeps a report of each replacement until the round loop takes it.

    `run_dir` is where the run's checkpoints are (None: no checkpoints); `max_retries` bounds how
    often the grid sends a dead actor's call again.
    """

    def __init__(
        self,
        factory: ActorFactory,
        node_ids: Sequence[int] | np.ndarray,
        *,
        max_retries: int,
        run_dir: Path | None = None,
        starts_after: int = 0,
    ) -> None:
        self.factory, self.max_retries, self.run_dir = factory, max_retries, run_dir
        self.journal = ClientJournal(np.unique(np.asarray(node_ids, dtype=np.int64)), starts_after)
        self.rebuilds = factory.config["client"]["app"] == DEFAULT_APP
        self._reports: list[dict[str, Any]] = []

    def replace(
        self,
        dead: ray.actor.ActorHandle,
        index: int,
        node_ids: np.ndarray,
        cause: str,
        *,
        attempt: int,
        resent: bool,
    ) -> ray.actor.ActorHandle:
        """A ready actor to serve `node_ids` in place of actor `index` (`dead`), holding their
        states. For the report: `attempt` is how often the call that found the actor dead had
        been retried, `resent` whether the grid sends it again.

        Raises `FedclError` or a `RayError` when no replacement can be started or restored.
        """
        kill_actors([dead])  # if it is only unreachable, it must not come back beside its heir
        actor = self.factory.start(1)[0]
        try:
            plan = self.plan(node_ids)
            ray.get(actor.restore_states.remote(plan.states, plan.trained))
        except BaseException:
            kill_actors([actor])
            raise
        self._report(index, cause, node_ids, plan, attempt=attempt, resent=resent)
        logger.warning(
            "client actor %d died (%s); replaced, %d clients moved (state: %s)",
            index,
            cause,
            len(node_ids),
            _counts(plan),
        )
        return actor

    def restore_moved(
        self, actor: ray.actor.ActorHandle, index: int, node_ids: np.ndarray, source: int
    ) -> None:
        """Give actor `index` (`actor`) the states of `node_ids`, which were moving to it from
        actor `source` when that one died (`RayGrid`'s `balance`), as a replacement gets them.

        Raises a `RayError` when the actor cannot take them.
        """
        plan = self.plan(node_ids)
        ray.get(actor.restore_states.remote(plan.states, plan.trained))
        cause = "it died before handing over the states of clients moving to another actor"
        self._report(source, cause, node_ids, plan, attempt=0, resent=True, moved_to=index)
        logger.warning(
            "client actor %d died before handing over %d clients; their states were restored on "
            "actor %d (state: %s)",
            source,
            len(node_ids),
            index,
            _counts(plan),
        )

    def _report(
        self, index: int, cause: str, node_ids: np.ndarray, plan: RestorePlan, **more: Any
    ) -> None:
        """Keep the report of restoring `node_ids`, the clients of dead actor `index`."""
        clients = partition_of(node_ids)
        report: dict[str, Any] = {
            "actor": index,
            "cause": cause,
            **more,
            "num_clients": len(clients),
            "clients": clients[:MAX_LISTED].tolist(),
            "state": plan.how,
            "checkpoint_round": plan.checkpoint_round,
        }
        if plan.lost:
            report["lost_clients"] = partition_of(np.asarray(plan.lost[:MAX_LISTED])).tolist()
        if plan.lost_keys:
            report["lost_keys"] = sorted(plan.lost_keys)
        self._reports.append(report)

    def plan(self, node_ids: np.ndarray) -> RestorePlan:
        """Where the state of each of `node_ids` comes from (see the module docstring)."""
        plan = RestorePlan()
        base_round, base = self._base(node_ids)
        plan.checkpoint_round = base_round if base_round else None
        last = self.journal.last_rounds(node_ids)
        trained = self.journal.trained_after(node_ids, base_round or 0) if self.rebuilds else {}
        for node, last_round in zip(node_ids.tolist(), last.tolist(), strict=True):
            if base_round is None:  # a resumed run whose checkpoints are gone
                how = "lost"
            elif last_round <= base_round:
                how = "checkpoint" if node in base else "empty"
                if node in base:
                    plan.states[node] = base[node]
            elif self.rebuilds:
                how = "rebuilt"
                state = base.get(node, RecordDict())
                plan.lost_keys.update(key for key in state if key not in REBUILT_KEYS)
                kept = {key: value for key, value in state.items() if key in REBUILT_KEYS}
                plan.states[node] = RecordDict(kept)
                plan.trained[node] = trained.get(node, [])
            else:
                how = "lost"
            plan.how[how] += 1
            if how == "lost":
                plan.lost.append(node)
        return plan

    def _base(self, node_ids: np.ndarray) -> tuple[int | None, dict[int, RecordDict]]:
        """(round, states of `node_ids`) that the journal continues: the latest good checkpoint
        if it covers the rounds before the journal, else the start of the run (round 0, no
        state); None when neither does."""
        checkpoint = None
        if self.run_dir is not None:
            checkpoint, _ = latest_checkpoint(self.run_dir)
        if checkpoint is not None and checkpoint.server_round >= self.journal.starts_after:
            wanted = set(node_ids.tolist())
            states = checkpoint.client_states()
            return checkpoint.server_round, {n: s for n, s in states.items() if n in wanted}
        if self.journal.starts_after == 0:
            return 0, {}
        return None, {}

    def take_reports(self) -> list[dict[str, Any]]:
        """The reports of the replacements since the last call, in order."""
        reports, self._reports = self._reports, []
        return reports
