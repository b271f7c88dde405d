"""`federaser`, approximate unlearning of a whole client by calibration (Liu et al. 2021).

During the run, every `unlearning.calibration_interval`-th round, the L2 norm of each array of
that round's global update is recorded (`UpdateNorms`: a float per array and round, nothing
else). To forget a client, the model rolls back to the state before the client's data first
became visible (`rollback.RollbackStore`, as `retrain`) and each recorded round since is played
again by the retained clients with fewer local epochs (`ceil(train.epochs ×
calibration_ratio)`), on the scenario without the client's data, same seeds and sampling; each
calibrated global update keeps its direction and takes the recorded magnitude, per array:

    new_{t+1} = new_t + ||U_old,t|| · U_new,t / ||U_new,t||

Rounds between recorded ones are not played (their events are). Only the global model changes:
the strategy's and the clients' states stay the run's.

Unlike the paper, which stores every client's uploaded model, the recorded magnitude is the
round's whole global update (the forgotten client's contribution in it): the run does not keep
per-client updates (they may be summed on the actors). A deletion that is not of a whole client
fails with an `UnlearningError` naming the method and the event.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedcl.engine.audit import DeletionAudit
from fedcl.scenario.scenario import Scenario
from fedcl.unlearning.data_absent import deleted_by, without_data
from fedcl.unlearning.replica import EngineParts, Replica
from fedcl.unlearning.retrain import _check_absent
from fedcl.unlearning.rollback import RollbackStore


class UpdateNorms:
    """The per-array L2 norms of the global update of every `interval`-th round (float64)."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.names: list[str] = []
        self.rounds: dict[int, np.ndarray] = {}  # round -> norm per name (in `names` order)

    def observe(self, server_round: int, before: ArrayRecord, after: ArrayRecord) -> None:
        """Record round `server_round`'s update `after - before`, if it is a recorded round."""
        if server_round % self.interval:
            return
        if not self.names:
            self.names = list(after.keys())
        self.rounds[server_round] = np.array(
            [_norm(after[n].numpy(), before[n].numpy()) for n in self.names]
        )

    def norms(self, server_round: int) -> dict[str, float] | None:
        """The recorded norms of `server_round` per array name; None if it was not recorded."""
        values = self.rounds.get(server_round)
        return None if values is None else dict(zip(self.names, values.tolist(), strict=True))

    @property
    def bytes(self) -> int:
        """The memory the recorded norms take."""
        return sum(v.nbytes for v in self.rounds.values())


def calibrated_step(
    base: ArrayRecord, trained: ArrayRecord, magnitudes: dict[str, float]
) -> ArrayRecord:
    """`base + magnitudes[name] · U / ||U||` per array, U = `trained - base` (FedEraser's
    calibration); an array whose U is zero, or that is not floating point, takes `trained`'s
    value."""
    result = ArrayRecord()
    for name, array in base.items():
        old, new = array.numpy(), trained[name].numpy()
        if not np.issubdtype(old.dtype, np.floating):
            result[name] = Array(new.copy())
            continue
        update = new.astype(np.float64) - old.astype(np.float64)
        size = float(np.linalg.norm(update))
        if size == 0.0:
            result[name] = Array(new.copy())
            continue
        step = old.astype(np.float64) + magnitudes[name] * update / size
        result[name] = Array(step.astype(old.dtype))
    return result


def check_whole_clients(scenario: Scenario, events: list[int]) -> None:
    """Raise ValueError (one line) unless every delete event of `events` deletes whole clients."""
    for event in scenario.timeline:
        if event.index in events and event.params.get("what") != "client":
            raise ValueError(
                f"federaser forgets whole clients only; delete event {event.index} (round "
                f"{event.round}) deletes {event.params.get('what')}"
            )


def calibrate(
    store: RollbackStore,
    norms: UpdateNorms,
    parts: EngineParts,
    scenario: Scenario,
    events: list[int],
    absent: list[int],
    server_round: int,
    audit: DeletionAudit,
) -> tuple[ArrayRecord | None, dict[str, Any]]:
    """Forget the clients of the delete events `events` of `server_round` (the data of `absent`,
    these and every earlier delete event, absent) by FedEraser's calibration from the rollback
    state; return the calibrated global arrays (None: the data was never visible, nothing to
    undo) and the cost: the round rolled back to, rounds calibrated, local epochs, client
    updates, seconds (replica start-up apart, in `start_s`). Calibration rounds are audited in
    `audit`."""
    check_whole_clients(scenario, events)
    at = store.rollback_round(events)
    if at is None:
        store.handled(events)
        return None, {"rolled_back_to": None, "rounds": 0, "seconds": 0.0}
    checkpoint = store.state(at)
    store.handled(events)
    cfg = parts.cfg
    epochs = max(1, math.ceil(cfg.train.epochs * cfg.unlearning.calibration_ratio))
    container = copy.deepcopy(parts.container)
    container["train"]["epochs"] = epochs
    started = time.perf_counter()
    forbidden = deleted_by(scenario, absent)
    fewer_epochs = dataclasses.replace(parts, container=container)
    replica = Replica(fewer_epochs, without_data(scenario, absent))
    start_s = time.perf_counter() - started
    updates = 0
    try:
        arrays = replica.load(checkpoint)
        for played in range(at + 1, server_round):
            arrays = replica.events(played, arrays)
            magnitudes = norms.norms(played)
            if magnitudes is not None:  # FedEraser calibrates the recorded rounds only
                trained = replica.train(played, arrays)
                trained_ids = replica.trained_ids(played)
                _check_absent(audit, played, trained_ids, forbidden)
                updates += len(trained_ids)
                arrays = calibrated_step(arrays, trained, magnitudes)
            store.observe(played, arrays, replica.strategy, replica.grid)
        arrays = replica.events(server_round, arrays)
    finally:
        replica.close()
    start_s += replica.warmup_s
    return arrays, {
        "rolled_back_to": at,
        "rounds": replica.rounds,
        "epochs": epochs,
        "client_updates": updates,
        "seconds": time.perf_counter() - started - start_s,
        "start_s": start_s,
    }


def _norm(after: np.ndarray, before: np.ndarray) -> float:
    return float(np.linalg.norm(after.astype(np.float64) - before.astype(np.float64)))
