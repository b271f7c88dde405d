"""`sharded`, exact unlearning by SISA-style federated sharding (Bourtoule et al. 2021).

The clients are split, seeded, into `unlearning.num_shards` groups. Each shard trains its own
global model, federated over its own clients only, with its own copy of the run's strategy
(`ShardedStrategy`): in each round the round's online clients (the run's usual draw) are split
by shard and each shard plays the round through the loop's own `train_round`. The run's global
arrays hold every shard's model, packed under `shards.<s>.` (`pack`, `unpack`); evaluation and
every measure predict with `Ensemble`, the shards' averaged logits or a majority vote.

Slices are the tasks: each shard keeps its state (arrays, strategy, its clients' states) at the
task boundaries a pending deletion needs (`SliceStore`: its last boundary before the deleted data
first became visible to one of its clients). A deletion retrains only the affected shards
(`unlearn`): from that slice, their rounds are replayed on a replica of the engine on the scenario
without the deleted data (same seeds, same sampling), the other shards' arrays are not touched.
Each shard's training depends only on its own clients, so the result is the shard trained
without the data from the start: exact.

Only strategies without continual hooks (stock Flower ones: FedAvg, FedProx, FedAdam, ...) can be
sharded: a continual strategy's hooks act on one global model (`check_sharded`).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from omegaconf import DictConfig
from torch import nn

from fedcl.engine.audit import DeletionAudit
from fedcl.engine.checkpoint import (
    Checkpoint,
    Snapshot,
    checkpoint_dir,
    client_states,
    load_strategy_state,
    read_checkpoint,
    strategy_state,
    write_checkpoint,
)
from fedcl.engine.flower_compat import partition_of
from fedcl.engine.grid import RayGrid
from fedcl.engine.record_codec import decode_records, encode_records
from fedcl.errors import ConfigError
from fedcl.models import model_from_config
from fedcl.scenario.scenario import Scenario
from fedcl.seeding import derive_rng
from fedcl.strategies import available_strategies, build_strategy, strategy_class
from fedcl.strategies.base import ContinualStrategy
from fedcl.unlearning.data_absent import deleted_by, without_data
from fedcl.unlearning.replica import EngineParts, Replica, set_client_states
from fedcl.unlearning.rollback import first_visible_round

FOLDER = "unlearning/slices"
PREFIX = "shards"  # packed array names: "shards.<s>.<name>", as `Ensemble.state_dict` has them


# --- shards and their arrays -------------------------------------------------------------------
def shard_assignment(num_clients: int, num_shards: int, seed: int) -> np.ndarray:
    """The shard of each client (int64, length `num_clients`): a seeded permutation of the
    clients dealt round-robin, so shards differ in size by at most one. Depends only on the
    arguments."""
    order = derive_rng(seed, "unlearning-shards").permutation(num_clients)
    shard_of = np.empty(num_clients, dtype=np.int64)
    shard_of[order] = np.arange(num_clients) % num_shards
    return shard_of


def pack(shards: Sequence[ArrayRecord]) -> ArrayRecord:
    """One ArrayRecord holding every shard's arrays, shard `s`'s under `shards.<s>.`."""
    packed = ArrayRecord()
    for s, arrays in enumerate(shards):
        for name, array in arrays.items():
            packed[f"{PREFIX}.{s}.{name}"] = array
    return packed


def unpack(packed: ArrayRecord, shard: int) -> ArrayRecord:
    """Shard `shard`'s arrays out of `pack`'s record, under their own names (same objects)."""
    head = f"{PREFIX}.{shard}."
    arrays = ArrayRecord()
    for name, array in packed.items():
        if name.startswith(head):
            arrays[name[len(head) :]] = array
    return arrays


def replace_shard(packed: ArrayRecord, shard: int, arrays: ArrayRecord) -> ArrayRecord:
    """`packed` with shard `shard`'s arrays replaced by `arrays`; the other shards' arrays are
    the same objects."""
    count = 1 + max(int(name.split(".")[1]) for name in packed)
    return pack([arrays if s == shard else unpack(packed, s) for s in range(count)])


class Ensemble(nn.Module):
    """The shard models as one predictor: `forward` gives the mean of the shards' logits
    (`aggregate="logits"`), or (`"vote"`) the log of each class's share of the shards' votes
    (each shard votes its argmax; smoothed by 1e-3 per class so that it is finite; ties go to
    the lowest class index, as argmax breaks them). Its `state_dict` is `pack`'s layout."""

    def __init__(self, members: Sequence[nn.Module], aggregate: str = "logits") -> None:
        super().__init__()
        if aggregate not in ("logits", "vote"):
            raise ValueError(f"unknown aggregate '{aggregate}'; valid: logits, vote")
        self.shards = nn.ModuleList(members)
        self.aggregate = aggregate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([member(x) for member in self.shards])  # (shards, batch, classes)
        if self.aggregate == "logits":
            return logits.mean(dim=0)
        classes = logits.shape[-1]
        votes = nn.functional.one_hot(logits.argmax(dim=-1), classes).sum(dim=0)
        smooth = 1e-3
        share = (votes.to(logits.dtype) + smooth) / (len(self.shards) + classes * smooth)
        return share.log()


def sharded(cfg: DictConfig) -> bool:
    """Whether the run trains one model per shard (`unlearning.method: sharded`)."""
    return cfg.unlearning.method == "sharded"


def evaluation_model(
    cfg: DictConfig, container: dict[str, Any], input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """The network the driver predicts with and whose `state_dict` is the run's global arrays:
    the run's model, or for a sharded run an `Ensemble` of `num_shards` copies of it (each with
    the run's initial weights)."""
    if not sharded(cfg):
        return model_from_config(container, input_shape, num_classes)
    members = [
        model_from_config(container, input_shape, num_classes)
        for _ in range(cfg.unlearning.num_shards)
    ]
    return Ensemble(members, cfg.unlearning.aggregate)


# --- the strategy of strategies ----------------------------------------------------------------
class _Trained:
    """Collects the trained-sample ids of every shard's step of one round (an audit's `record`),
    so that the run's audit records the round once."""

    def __init__(self) -> None:
        self.ids: dict[int, np.ndarray] = {}

    def record(self, server_round: int, trained: dict[int, np.ndarray]) -> None:
        self.ids.update(trained)


class ShardedStrategy:
    """One copy of the run's strategy per shard, each aggregating only its shard's clients.

    `train_round` is what the round loop calls instead of training one model (see
    `fedcl.engine.loop.train_round`); `active` names the shards that train (all of them, except
    in a replay of one shard). The strategy has no continual hooks; `state_dict` holds every
    shard's strategy state (under `shard_<s>.`)."""

    def __init__(self, shards: list[Any], shard_of: np.ndarray) -> None:
        self.shards = shards
        self.shard_of = shard_of
        self.active: tuple[int, ...] = tuple(range(len(shards)))

    @property
    def fraction_train(self) -> Any:
        """The shards' `fraction_train` (what the engine sizes its vectorize probe by)."""
        return getattr(self.shards[0], "fraction_train", 1.0)

    def members(self, shard: int) -> np.ndarray:
        """The clients of `shard`, ascending."""
        return np.flatnonzero(self.shard_of == shard)

    def train_round(
        self,
        cfg: DictConfig,
        grid: Any,
        arrays: ArrayRecord,
        scenario: Scenario,
        server_round: int,
        audit: Any,
    ) -> Any:
        """Train `server_round` in every active shard: each shard's strategy on its model and on
        the round's online clients of the shard (the loop's `train_round`, restricted to them);
        return the loop's `PlayedRound` with every shard's new arrays packed and the shards'
        steps summed (train metrics under `shard_<s>/`). Inactive shards' arrays pass through."""
        from fedcl.engine import loop  # the loop imports this package

        trained = _Trained()
        new = [unpack(arrays, s) for s in range(len(self.shards))]
        steps, online, available, seconds = [], None, None, 0.0
        for s in self.active:
            played = loop.train_round(
                cfg,
                self.shards[s],
                grid,
                new[s],
                scenario,
                server_round,
                trained,
                task_end_hooks=False,
                members=self.shard_of == s,
            )
            new[s] = played.arrays
            steps.append((s, played.step))
            available, seconds = played.available, seconds + played.train_s
            online = played.online if online is None else np.union1d(online, played.online)
        audit.record(server_round, trained.ids)
        packed = pack(new)
        step = loop.TrainStep(
            packed,
            sampled=sum(st.sampled for _, st in steps),
            succeeded=sum(st.succeeded for _, st in steps),
            problems=sorted(p for _, st in steps for p in st.problems),
            metrics={f"shard_{s}/{k}": v for s, st in steps for k, v in st.metrics.items()},
            summed=sum(st.summed for _, st in steps),
        )
        if steps and all(st.skipped for _, st in steps):
            step.skipped = "; ".join(f"shard {s}: {st.skipped}" for s, st in steps)
        discarded = [f"shard {s}: {st.discarded}" for s, st in steps if st.discarded]
        step.discarded = "; ".join(discarded) or None
        if online is None:
            online = available = np.zeros(0, dtype=np.int64)
        return loop.PlayedRound(packed, step, online, available, seconds)

    def state_dict(self) -> RecordDict:
        """Every shard's strategy state, each record under `shard_<s>.`."""
        state = RecordDict()
        for s, strategy in enumerate(self.shards):
            own, why = strategy_state(strategy)
            if own is None:
                raise NotImplementedError(why)
            for name, record in own.items():
                state[f"shard_{s}.{name}"] = record
        return state

    def load_state_dict(self, state: RecordDict) -> None:
        """Give each shard's strategy back its part of `state_dict`."""
        for s, strategy in enumerate(self.shards):
            load_strategy_state(strategy, self.shard_state(state, s))

    @staticmethod
    def shard_state(state: RecordDict, shard: int) -> RecordDict:
        """Shard `shard`'s strategy state out of `state_dict`'s."""
        head = f"shard_{shard}."
        own = RecordDict()
        for name, record in state.items():
            if name.startswith(head):
                own[name[len(head) :]] = record
        return own


def build_run_strategy(container: dict[str, Any], cfg: DictConfig) -> Any:
    """The run's strategy from the resolved config: `strategy.*` built once, or, for a sharded
    run, a `ShardedStrategy` of `num_shards` copies of it."""
    if not sharded(cfg):
        return build_strategy(container["strategy"], cfg.clients.num)
    count = cfg.unlearning.num_shards
    copies = [build_strategy(container["strategy"], cfg.clients.num) for _ in range(count)]
    return ShardedStrategy(copies, shard_assignment(cfg.clients.num, count, cfg.seed))


def check_sharded(cfg: DictConfig, strategy: ShardedStrategy) -> None:
    """Refuse, in one line, what cannot be sharded: a continual strategy (its hooks act on one
    global model), one whose state cannot be kept for slices, or shards smaller than the
    strategy's minimum of clients."""
    label = cfg.strategy.get("target") or cfg.strategy.get("name")
    one = strategy.shards[0]
    if isinstance(one, ContinualStrategy):
        raise ConfigError(
            f"unlearning.method=sharded trains one model per shard with a strategy without "
            f"continual hooks; '{label}' has them (valid: {', '.join(shardable_strategies())})"
        )
    state, why = strategy_state(one)
    if state is None:
        raise ConfigError(f"unlearning.method=sharded needs the strategy's state for slices: {why}")
    minimums = [getattr(one, a, 0) for a in ("min_available_nodes", "min_train_nodes")]
    needed = max([n for n in minimums if isinstance(n, int)] + [1])
    smallest = int(np.bincount(strategy.shard_of, minlength=len(strategy.shards)).min())
    if smallest < needed:
        raise ConfigError(
            f"unlearning.num_shards={len(strategy.shards)} leaves shards of {smallest} of the "
            f"{cfg.clients.num} clients, fewer than strategy '{label}' needs ({needed}); use at "
            f"most {cfg.clients.num // needed} shards"
        )


def shardable_strategies() -> list[str]:
    """The registered strategies without continual hooks (what `sharded` can run)."""
    found = []
    for name in available_strategies():
        try:
            if not issubclass(strategy_class(name, None), ContinualStrategy):
                found.append(name)
        except ConfigError:
            continue
    return found


# --- slices ------------------------------------------------------------------------------------
def slice_round(scenario: Scenario, before: int) -> int:
    """The last slice boundary (round 0 or a global task's last round) at or before `before`."""
    ends = [r for r in scenario.task_end_rounds() if r <= before]
    return max([0, *ends])


class SliceStore:
    """Each shard's state at the slice boundaries its pending deletions roll back to.

    For each delete event and each shard holding some of its data, the slice is the shard's last
    task boundary before that data first became visible to a client of the shard; states are
    checkpoints under `unlearning/slices/shard_<s>/`, dropped once no pending event needs them.
    """

    def __init__(self, run_dir: Path, scenario: Scenario, shard_of: np.ndarray, vectorize: str):
        self.base = Path(run_dir) / FOLDER
        self.shard_of, self.vectorize = shard_of, vectorize
        self.pending: dict[tuple[int, int], int] = {}  # (event, shard) -> slice round
        for event in scenario.timeline:
            if event.kind != "delete":
                continue
            by_shard: dict[int, dict[int, np.ndarray]] = {}
            for client, ids in scenario.deleted_by_event.get(event.index, {}).items():
                by_shard.setdefault(int(shard_of[client]), {})[client] = ids
            for shard, deleted in sorted(by_shard.items()):
                part = dataclasses.replace(scenario, deleted_by_event={event.index: deleted})
                visible = first_visible_round(part, event.index)
                if visible is not None and visible < event.round:
                    self.pending[(event.index, shard)] = slice_round(scenario, visible - 1)
        self.written = 0
        self.bytes = 0

    def wanted(self, shard: int, server_round: int) -> bool:
        """Whether shard `shard`'s state after `server_round` is a pending event's slice."""
        return any(s == shard and r == server_round for (_, s), r in self.pending.items())

    def observe(
        self,
        server_round: int,
        arrays: ArrayRecord,
        strategy: ShardedStrategy,
        grid: RayGrid,
        shards: Sequence[int] | None = None,
    ) -> None:
        """After `server_round` (0: before round 1): keep the slice state of each of `shards`
        (None: every shard) that a pending event needs."""
        shards = range(len(strategy.shards)) if shards is None else shards
        wanted = [s for s in shards if self.wanted(s, server_round)]
        if not wanted:
            return
        states = decode_records(client_states(grid))
        for s in wanted:
            own = {n: st for n, st in states.items() if self.shard_of[partition_of(n)] == s}
            snapshot = Snapshot(
                server_round,
                unpack(arrays, s),
                strategy.shards[s],
                encode_records(own),
                {},
                {},
                self.vectorize,
            )
            written = write_checkpoint(self.base / f"shard_{s}", snapshot)
            if written.unsaved_strategy:
                raise RuntimeError(written.unsaved_strategy)
            self.written += 1
            self.bytes += written.size

    def rollbacks(self, events: Sequence[int]) -> dict[int, int]:
        """Per shard holding data of `events` that was ever visible: the slice round to roll
        back to (the earliest of its events')."""
        found: dict[int, int] = {}
        for (event, shard), at in self.pending.items():
            if event in events:
                found[shard] = min(at, found.get(shard, at))
        return dict(sorted(found.items()))

    def state(self, shard: int, server_round: int) -> Checkpoint:
        """Shard `shard`'s kept state after `server_round`, verified."""
        return read_checkpoint(checkpoint_dir(self.base / f"shard_{shard}", server_round))

    def handled(self, events: Sequence[int]) -> None:
        """`events` are unlearned: drop the slice states no pending event needs."""
        for key in [k for k in self.pending if k[0] in events]:
            del self.pending[key]
        for folder in self.base.glob("shard_*/checkpoints") if self.base.is_dir() else ():
            shard = int(folder.parent.name.split("_")[1])
            for path in folder.glob("round_*"):
                if not self.wanted(shard, int(path.name.split("_")[1])):
                    shutil.rmtree(path, ignore_errors=True)


# --- a deletion ----------------------------------------------------------------------------------
def unlearn(
    store: SliceStore,
    parts: EngineParts,
    scenario: Scenario,
    events: list[int],
    absent: list[int],
    server_round: int,
    arrays: ArrayRecord,
    strategy: ShardedStrategy,
    grid: RayGrid,
    audit: DeletionAudit,
    replica: Replica | None = None,
) -> tuple[ArrayRecord | None, dict[str, Any]]:
    """Unlearn the delete events `events` of `server_round` (the data of `absent`, these and
    every earlier delete event, absent) by retraining only the affected shards, each from its
    slice; return the run's arrays with those shards' replaced (None: no shard ever saw the
    data) and the cost: shards retrained, the slice round of each, rounds re-run (shard-rounds:
    in all and per shard), client updates re-run, seconds (replica start-up apart, `start_s`).

    Each affected shard's rounds since its slice are replayed on a replica on the scenario
    without the data, with only that shard active; its strategy state and its clients' states
    then replace the run's. Other shards' arrays, strategy states and clients are not touched.
    Replayed rounds are audited against the absent data and counted in `audit`."""
    from fedcl.unlearning.retrain import _check_absent

    rollbacks = store.rollbacks(events)
    slices = {shard: store.state(shard, at) for shard, at in rollbacks.items()}
    store.handled(events)
    cost: dict[str, Any] = {"shards": list(rollbacks), "rolled_back_to": rollbacks, "rounds": 0}
    if not rollbacks:
        cost["seconds"] = 0.0
        return None, cost
    started = time.perf_counter()
    forbidden = deleted_by(scenario, absent)
    own = replica is None
    if replica is None:
        replica = Replica(parts, without_data(scenario, absent))
    start_s = time.perf_counter() - started
    per_shard: dict[int, int] = {}
    updates = 0
    try:
        for shard, at in rollbacks.items():
            replica.reset()
            played = replica.strategy
            played.active = (shard,)
            checkpoint = slices[shard]
            load_strategy_state(played.shards[shard], checkpoint.strategy_state())
            set_client_states(replica.grid, checkpoint.client_states())
            replayed_arrays = replace_shard(arrays, shard, checkpoint.arrays())
            for replayed in range(at + 1, server_round):
                replayed_arrays = replica.events(replayed, replayed_arrays)
                replayed_arrays = replica.train(replayed, replayed_arrays)
                trained = replica.trained_ids(replayed)
                _check_absent(audit, replayed, trained, forbidden)
                updates += len(trained)
                store.observe(replayed, replayed_arrays, played, replica.grid, [shard])
            replayed_arrays = replica.events(server_round, replayed_arrays)
            arrays = replace_shard(arrays, shard, unpack(replayed_arrays, shard))
            state, why = strategy_state(played.shards[shard])
            if state is None:
                raise RuntimeError(f"the replayed shard's strategy state cannot be taken: {why}")
            load_strategy_state(strategy.shards[shard], state)
            _take_clients(grid, replica.grid, strategy.shard_of == shard)
            per_shard[shard] = replica.rounds
            start_s += replica.warmup_s
    finally:
        if own:
            replica.close()
    cost.update(
        rounds=sum(per_shard.values()),
        rounds_per_shard=per_shard,
        client_updates=updates,
        seconds=time.perf_counter() - started - start_s,
        start_s=start_s,
    )
    return arrays, cost


def _take_clients(grid: RayGrid, source: RayGrid, members: np.ndarray) -> None:
    """The clients in `members` (a mask over clients) take their states in `source`; every other
    client of `grid` keeps its own."""
    states = decode_records(client_states(grid))
    theirs = decode_records(client_states(source))
    for node in set(states) | set(theirs):
        if members[partition_of(node)]:
            if node in theirs:
                states[node] = theirs[node]
            else:
                states.pop(node, None)
    set_client_states(grid, states)
