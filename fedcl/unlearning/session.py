"""The unlearning of a run: the round loop's call-outs (`Unlearning`), the checks made before the
run starts (`check_unlearning`), and the records it leaves (unlearning.jsonl, summary.json).

At each round with delete events, after the round's events and before it trains, the method
runs; the model before and after it is scored on the deletion's forget, retain and test sets
(`measures`), and with `unlearning.oracle` compared with the oracle: the same run with the
deleted data (of this and every earlier deletion) absent from the start, at the same moment
(after the oracle's events of that round, before it trains).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from omegaconf import DictConfig

from fedcl.engine.audit import DeletionAudit
from fedcl.engine.checkpoint import (
    Checkpoint,
    Snapshot,
    checkpoint_dir,
    client_states,
    read_checkpoint,
    strategy_state,
    write_checkpoint,
)
from fedcl.engine.grid import RayGrid
from fedcl.errors import ConfigError
from fedcl.imports import load_object
from fedcl.scenario.scenario import Scenario
from fedcl.strategies import available_strategies, strategy_class
from fedcl.strategies.base import ClientExtension
from fedcl.unlearning import measures
from fedcl.unlearning.ascent import ASCENT_QUERY, ascend
from fedcl.unlearning.data_absent import forget_sets, without_data
from fedcl.unlearning.federaser import UpdateNorms, calibrate
from fedcl.unlearning.methods import (
    BUILT_IN,
    Method,
    UnlearningContext,
    UnlearningError,
    method_options,
)
from fedcl.unlearning.replica import EngineParts, Replica
from fedcl.unlearning.retrain import merge_audit, retrain
from fedcl.unlearning.rollback import RollbackStore
from fedcl.unlearning.sharded import (
    SliceStore,
    check_sharded,
    evaluation_model,
    shard_assignment,
)
from fedcl.unlearning.sharded import unlearn as unlearn_shards

RECORDS = "unlearning.jsonl"
ORACLE_FOLDER = "unlearning/oracle"  # the last deletion's oracle state, until the run ends


def exact_strategies() -> list[str]:
    """The registered strategies that remove a deleted contribution exactly (`native`)."""
    found = []
    for name in available_strategies():
        try:
            if getattr(strategy_class(name, None), "exact_deletion", False):
                found.append(name)
        except ConfigError:
            continue
    return found


# Methods the session runs itself (they roll back states it keeps), not functions of a context.
SESSION_METHODS = ("retrain", "sharded", "federaser")


def resolve_method(cfg: DictConfig) -> Method | None:
    """The configured method's function; None for `retrain`, `sharded` and `federaser` (done by
    the session itself)."""
    name = cfg.unlearning.method
    if name in SESSION_METHODS:
        return None
    if name in BUILT_IN:
        return BUILT_IN[name]
    found = load_object(name, what="unlearning.method")
    if not callable(found):
        raise ConfigError(f"unlearning.method '{name}' is not callable")
    return found


def check_unlearning(cfg: DictConfig, strategy: Any, *, resuming: bool) -> None:
    """Refuse, before the run starts (one line), what the `unlearning` section cannot do:
    `native` on a strategy that cannot remove a contribution exactly, `retrain` or `federaser`
    on one whose state cannot be saved, `sharded` on one it cannot shard (`check_sharded`), a
    method path that does not import, and resuming such a run."""
    section = cfg.unlearning
    if section.method == "none" and not section.oracle:
        return
    if resuming:
        raise ConfigError("resuming a run with unlearning (method or oracle) is not supported yet")
    resolve_method(cfg)
    label = cfg.strategy.get("target") or cfg.strategy.get("name")
    if section.method == "native" and not getattr(strategy, "exact_deletion", False):
        raise ConfigError(
            f"unlearning.method=native needs a strategy that removes a contribution exactly; "
            f"'{label}' cannot (valid: {', '.join(exact_strategies())})"
        )
    if section.method == "sharded":
        check_sharded(cfg, strategy)
    if section.method in ("retrain", "federaser") or section.oracle:
        state, why = strategy_state(strategy)
        if state is None:
            raise ConfigError(f"unlearning needs the strategy's state for rollbacks: {why}")


def with_unlearning_handlers(
    extension: ClientExtension | None, cfg: DictConfig
) -> ClientExtension | None:
    """The strategy's client half plus the handlers the configured method may need (`ascent`'s,
    also installed for a user's method, which may call `UnlearningContext.ascend`)."""
    method = cfg.unlearning.method
    if method != "ascent" and ":" not in method:
        return extension
    handlers = dict(extension.handlers) if extension is not None else {}
    extras = dict(extension.train_extras) if extension is not None else {}
    handlers[ASCENT_QUERY] = ascend
    return ClientExtension(handlers=handlers, train_extras=extras)


@dataclass
class OracleState:
    """The oracle at one deletion round: its arrays there, and what getting there cost."""

    arrays: ArrayRecord
    seconds: float
    rounds: int


class Unlearning:
    """The round loop's call-outs: `start`, `after_events` (runs the method at a round with
    delete events), `after_round` (keeps rollback states) and `summary`."""

    def __init__(
        self, parts: EngineParts, scenario: Scenario, out_dir: Path, initial: ArrayRecord
    ) -> None:
        self.parts, self.scenario, self.cfg = parts, scenario, parts.cfg
        self.out_dir = Path(out_dir)
        self.method_name = self.cfg.unlearning.method
        self.method = resolve_method(self.cfg)
        self.options = method_options(self.cfg)
        self.groups: dict[int, list[int]] = {}  # round -> its delete events (timeline indices)
        for event in scenario.timeline:
            if event.kind == "delete":
                self.groups.setdefault(event.round, []).append(event.index)
        self.initial = initial
        self.previous = initial  # the global arrays after the latest round
        self.trained_from: ArrayRecord | None = None  # a method's arrays, this round trains from
        self.handled: list[int] = []
        vectorize = parts.container["engine"]["vectorize"]
        self.store = (
            RollbackStore(out_dir, scenario, vectorize)
            if self.method_name in ("retrain", "federaser")
            else None
        )
        self.slices = None  # `sharded`: each shard's slice states
        self.norms = None  # `federaser`: the global updates' norms, per recorded round
        if self.method_name == "sharded":
            shard_of = shard_assignment(
                self.cfg.clients.num, self.cfg.unlearning.num_shards, self.cfg.seed
            )
            self.slices = SliceStore(out_dir, scenario, shard_of, vectorize)
        if self.method_name == "federaser":
            self.norms = UpdateNorms(self.cfg.unlearning.calibration_interval)
        self.oracles: dict[int, OracleState] = {}
        self.final_oracle: ArrayRecord | None = None
        # The last deletion's oracle replica, and its state there, to play on to the end.
        self.tail: tuple[Replica, Checkpoint] | None = None
        self.records: list[dict[str, Any]] = []
        self.model = evaluation_model(
            self.cfg, parts.container, parts.dataset.input_shape, parts.dataset.num_classes
        )

    # --- call-outs of the round loop -----------------------------------------------------------
    def start(self, first_round: int, arrays: ArrayRecord, strategy: Any, grid: RayGrid) -> None:
        """Before round 1: keep the state of round 0 (retrain, federaser; sharded: each
        shard's)."""
        if self.store is not None:
            self.store.observe(0, arrays, strategy, grid)
        if self.slices is not None:
            self.slices.observe(0, arrays, strategy, grid)

    def close(self) -> None:
        """Stop any replica still running (the loop ends, finished or not)."""
        if self.tail is not None:
            self.tail[0].close()
            self.tail = None

    def after_events(
        self,
        server_round: int,
        arrays: ArrayRecord,
        strategy: Any,
        grid: RayGrid,
        audit: DeletionAudit,
    ) -> ArrayRecord:
        """At a round with delete events: run the method, measure, write unlearning.jsonl."""
        events = self.groups.get(server_round)
        if not events:
            return arrays
        sets = measures.eval_sets(
            self.scenario, self.parts.dataset, events, server_round, self.cfg.seed
        )
        # The model as the previous round left it: the round's events (a strategy's own removal
        # in `on_delete`) have already run.
        before = measures.scores(self.model, self.previous, sets)
        replica = None
        try:
            if self.cfg.unlearning.oracle or self.method_name in ("retrain", "sharded"):
                replica = Replica(self.parts, without_data(self.scenario, self.handled + events))
            if self.cfg.unlearning.oracle:
                try:
                    self._run_oracle(server_round, replica)
                except Exception as exc:
                    raise UnlearningError(
                        f"the unlearning oracle failed at the delete event(s) {events} of round "
                        f"{server_round}: {_first_line(exc)}"
                    ) from exc
            started = time.perf_counter()
            new, cost, log = self._run_method(
                server_round, events, arrays, strategy, grid, audit, replica
            )
        except UnlearningError:
            raise
        except Exception as exc:
            raise UnlearningError(
                f"unlearning method '{self.method_name}' failed at the delete event(s) "
                f"{events} of round {server_round}: {_first_line(exc)}"
            ) from exc
        finally:
            if replica is not None and (self.tail is None or self.tail[0] is not replica):
                replica.close()
        cost.setdefault("seconds", time.perf_counter() - started)
        self.handled += events
        arrays = new if new is not None else arrays
        self.trained_from = arrays
        record = self._record(server_round, events, sets, before, arrays, cost, log)
        self.records.append(record)
        with open(self.out_dir / RECORDS, "a", encoding="utf-8") as file:
            file.write(json.dumps(record, allow_nan=True) + "\n")
        return arrays

    def after_round(
        self,
        server_round: int,
        arrays: ArrayRecord,
        strategy: Any,
        grid: RayGrid,
        audit: DeletionAudit,
    ) -> None:
        """After `server_round`: keep the rollback state `retrain` may need (the slices of
        `sharded`, the update norms of `federaser`); after the last round, play the oracle on to
        the end."""
        if self.norms is not None:
            start = self.trained_from if self.trained_from is not None else self.previous
            self.norms.observe(server_round, start, arrays)
        self.previous, self.trained_from = arrays, None
        if server_round == self.cfg.rounds and self.tail is not None:
            self._finish_oracle()
        if self.store is not None:
            self.store.observe(server_round, arrays, strategy, grid)
        if self.slices is not None:
            self.slices.observe(server_round, arrays, strategy, grid)

    def summary(self, final: ArrayRecord) -> dict[str, Any]:
        """summary.json's `unlearning`: the method, each deletion's measures in short, the
        means of the gaps to the oracle, and the final model's distance to the oracle's."""
        result: dict[str, Any] = {
            "method": self.method_name,
            "oracle": bool(self.cfg.unlearning.oracle),
            "deletions": [
                {k: r[k] for k in ("round", "events", "unlearned", "cost") if k in r}
                | ({"gap": r["gap"], "l2_to_oracle": r["l2_to_oracle"]} if "gap" in r else {})
                for r in self.records
            ],
        }
        if self.store is not None:
            result["rollback_states"] = {"written": self.store.written, "bytes": self.store.bytes}
        if self.slices is not None:
            result["slice_states"] = {"written": self.slices.written, "bytes": self.slices.bytes}
        if self.norms is not None:
            result["recorded_norms"] = {"rounds": len(self.norms.rounds), "bytes": self.norms.bytes}
        if self.records and "gap" in self.records[0]:
            for key in self.records[0]["gap"]:
                result[f"mean_gap_{key}"] = float(np.mean([r["gap"][key] for r in self.records]))
        if self.final_oracle is not None:
            sets = measures.eval_sets(
                self.scenario, self.parts.dataset, self.handled, self.cfg.rounds, self.cfg.seed
            )
            mine = measures.scores(self.model, final, sets)
            oracle = measures.scores(self.model, self.final_oracle, sets)
            result["final"] = {
                "unlearned": mine,
                "oracle": oracle,
                "gap": {k: mine[k] - oracle[k] for k in mine},
                "l2_to_oracle": measures.l2_distance(final, self.final_oracle),
            }
        return result

    # --- the work ------------------------------------------------------------------------------
    def _run_method(
        self,
        server_round: int,
        events: list[int],
        arrays: ArrayRecord,
        strategy: Any,
        grid: RayGrid,
        audit: DeletionAudit,
        replica: Replica | None,
    ) -> tuple[ArrayRecord | None, dict[str, Any], dict[str, Any]]:
        """(new arrays or None, cost, what the method logged)."""
        found = forget_sets(self.scenario, events, server_round)
        forget = {client: ids for client, (ids, _) in found.items()}
        if self.method_name == "sharded":
            assert self.slices is not None
            arrays, cost = unlearn_shards(
                self.slices,
                self.parts,
                self.scenario,
                events,
                self.handled + events,
                server_round,
                arrays,
                strategy,
                grid,
                audit,
                replica,
            )
            return arrays, cost, {}
        if self.method_name == "federaser":
            assert self.store is not None and self.norms is not None
            arrays, cost = calibrate(
                self.store,
                self.norms,
                self.parts,
                self.scenario,
                events,
                self.handled + events,
                server_round,
                audit,
            )
            return arrays, cost, {}
        if self.method_name == "retrain":
            assert self.store is not None
            arrays, cost = retrain(
                self.store,
                self.parts,
                self.scenario,
                events,
                self.handled + events,
                server_round,
                strategy,
                grid,
                audit,
                replica,
            )
            return arrays, cost, {}
        side_audit = DeletionAudit(self.scenario, None)
        context = UnlearningContext(
            server_round,
            tuple(events),
            forget,
            arrays,
            strategy,
            grid,
            self.scenario,
            self.cfg,
            side_audit,
        )
        started = time.perf_counter()
        assert self.method is not None
        new = self.method(context, **self.options)
        merge_audit(audit, side_audit)
        if new is not None and not isinstance(new, ArrayRecord):
            raise TypeError(f"returned {type(new).__name__}, not an ArrayRecord or None")
        cost = {"rounds": context.rounds, "seconds": time.perf_counter() - started}
        return new, cost, context.log

    def _run_oracle(self, server_round: int, replica: Replica) -> None:
        """The run with the data of every delete event up to `server_round` absent from the
        start, to just before `server_round` trains; the last deletion's state is kept (on disk)
        to play on to the end."""
        replica.reset()
        replica.clear_clients()
        arrays = self.initial
        for played in range(1, server_round):
            arrays = replica.train(played, replica.events(played, arrays))
        seconds, rounds = replica.seconds, replica.rounds
        arrays = replica.events(server_round, arrays)
        self.oracles[server_round] = OracleState(arrays, seconds, rounds)
        if server_round == max(self.groups):
            snapshot = Snapshot(
                server_round,
                arrays,
                replica.strategy,
                client_states(replica.grid),
                {},
                {},
                self.parts.container["engine"]["vectorize"],
            )
            write_checkpoint(self.out_dir / ORACLE_FOLDER, snapshot)
            self.tail = (
                replica,
                read_checkpoint(checkpoint_dir(self.out_dir / ORACLE_FOLDER, server_round)),
            )

    def _finish_oracle(self) -> None:
        """The last deletion's oracle, played from its kept state to the end of the run."""
        assert self.tail is not None
        replica, checkpoint = self.tail
        try:
            replica.reset()
            arrays = replica.load(checkpoint)
            arrays = replica.train(checkpoint.server_round, arrays)
            for played in range(checkpoint.server_round + 1, self.cfg.rounds + 1):
                arrays = replica.train(played, replica.events(played, arrays))
            self.final_oracle = arrays
        finally:
            self.close()
            shutil.rmtree(self.out_dir / ORACLE_FOLDER, ignore_errors=True)

    def _record(
        self,
        server_round: int,
        events: list[int],
        sets: measures.EvalSets,
        before: dict[str, float],
        arrays: ArrayRecord,
        cost: dict[str, Any],
        log: dict[str, Any],
    ) -> dict[str, Any]:
        """The unlearning.jsonl line of the deletion in `server_round`."""
        after = measures.scores(self.model, arrays, sets)
        record: dict[str, Any] = {
            "round": server_round,
            "events": events,
            "method": self.method_name,
            "forget_samples": len(sets.forget[1]),
            "before": before,
            "unlearned": after,
            "cost": cost,
        }
        if log:
            record["log"] = log
        oracle = self.oracles.get(server_round)
        if oracle is not None:
            mine = measures.scores(self.model, oracle.arrays, sets)
            record["oracle"] = mine
            record["gap"] = {k: after[k] - mine[k] for k in after}
            record["l2_to_oracle"] = measures.l2_distance(arrays, oracle.arrays)
            record["oracle_cost"] = {"rounds": oracle.rounds, "seconds": oracle.seconds}
            cost["rounds_ratio"] = cost["rounds"] / oracle.rounds if oracle.rounds else math.nan
            cost["seconds_ratio"] = cost["seconds"] / oracle.seconds if oracle.seconds else math.nan
        return record


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
