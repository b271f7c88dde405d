"""`retrain`, exact unlearning: roll back to the state before the deleted data was first trained
on, replay the rounds since with the data absent, and hand the replayed state to the run.

The replay is a `Replica` on the scenario without the deleted data (`data_absent.without_data`),
started from the rollback state (`rollback.RollbackStore`); it plays the same rounds with the
same seeds through the round loop's own code, so the result is the run that never had the data.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedcl.engine.audit import DeletionAudit
from fedcl.engine.checkpoint import client_states, load_strategy_state, strategy_state
from fedcl.engine.grid import RayGrid
from fedcl.engine.record_codec import decode_records
from fedcl.scenario.scenario import Scenario
from fedcl.unlearning.data_absent import deleted_by, without_data
from fedcl.unlearning.replica import EngineParts, Replica, set_client_states
from fedcl.unlearning.rollback import RollbackStore


def retrain(
    store: RollbackStore,
    parts: EngineParts,
    scenario: Scenario,
    events: list[int],
    absent: list[int],
    server_round: int,
    strategy: Any,
    grid: RayGrid,
    audit: DeletionAudit,
    replica: Replica | None = None,
) -> tuple[ArrayRecord | None, dict[str, Any]]:
    """Unlearn the delete events `events` of `server_round` by rollback and replay, the data of
    the delete events `absent` (these and every earlier one) absent; return the global arrays
    (None: the data was never visible to a client, nothing to undo) and the cost: the round
    rolled back to, rounds re-run, client updates re-run, seconds (replica start-up apart, in
    `start_s`).

    The replay's rounds are audited against the scenario without the data, and counted in
    `audit`; `strategy` and the clients of `grid` take the replayed state. `replica`: one on
    the scenario without the data to replay on (reset first, left open), else one is started."""
    rolled_back_to = store.rollback_round(events)
    if rolled_back_to is None:  # the data was never visible to anyone: nothing to undo
        store.handled(events)
        return None, {"rolled_back_to": None, "rounds": 0, "seconds": 0.0}
    cost: dict[str, Any] = {"rolled_back_to": rolled_back_to, "rounds": 0, "seconds": 0.0}
    checkpoint = store.state(rolled_back_to)
    store.handled(events)
    started = time.perf_counter()
    forbidden = deleted_by(scenario, absent)
    own = replica is None
    if replica is None:
        replica = Replica(parts, without_data(scenario, absent))
    else:
        replica.reset()
    start_s = time.perf_counter() - started
    updates = 0
    try:
        arrays = replica.load(checkpoint)
        for replayed in range(rolled_back_to + 1, server_round):
            arrays = replica.events(replayed, arrays)
            arrays = replica.train(replayed, arrays)
            trained = replica.trained_ids(replayed)
            _check_absent(audit, replayed, trained, forbidden)
            updates += len(trained)
            store.observe(replayed, arrays, replica.strategy, replica.grid)
        arrays = replica.events(server_round, arrays)
        state, why = strategy_state(replica.strategy)
        if state is None:
            raise RuntimeError(f"the replayed strategy's state cannot be taken: {why}")
        load_strategy_state(strategy, state)
        set_client_states(grid, decode_records(client_states(replica.grid)))
    finally:
        if own:
            replica.close()
    start_s += replica.warmup_s
    cost.update(
        rounds=replica.rounds,
        client_updates=updates,
        seconds=time.perf_counter() - started - start_s,
    )
    cost["start_s"] = start_s  # the replica's start and first-round warm-up, left out
    return arrays, cost


def merge_audit(audit: DeletionAudit, other: DeletionAudit) -> None:
    """Count `other`'s deleted samples used (a replay's, a fine-tune's) in the run's `audit`."""
    audit.used_after_delete += other.used_after_delete
    audit.violations.extend(other.violations)


def _check_absent(
    audit: DeletionAudit, server_round: int, trained: dict[int, np.ndarray], forbidden: np.ndarray
) -> None:
    """Count in `audit` every replayed sample among the `forbidden` ids (the absent data): a
    check of the replay that does not trust the replica's own scenario."""
    for client, ids in sorted(trained.items()):
        bad = int(np.isin(ids, forbidden).sum())
        if bad:
            audit.used_after_delete += bad
            audit.violations.append({"round": server_round, "client": client, "samples": bad})
