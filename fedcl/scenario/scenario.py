"""A scenario: the dataset cut into tasks, each task spread over clients, and one event timeline
(task switches, drift, deletions, clients joining and leaving) placed on rounds.

The scenario holds index arrays and event descriptions only, never copies of the data: a client's
view of its data in a round is derived from the shared arrays by `client_view`. It is built on
the driver from the config and seed alone, and shipped once to every actor through Ray's object
store, so driver and clients agree on every client's task, concept and deleted samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedcl.errors import ConfigError
from fedcl.scenario.datasets import ArrayDataset
from fedcl.scenario.drift import Drift, make_drift
from fedcl.scenario.events import (
    DRIFT_EVENT_KEYS,
    Event,
    build_timeline,
    generate_events,
    parse_event,
)
from fedcl.scenario.partition import PARTITIONS, partition_indices
from fedcl.scenario.tasks import class_incremental_split, task_sample_mask
from fedcl.seeding import derive_rng, derive_seed

SCENARIOS = ("class_incremental", "task_incremental", "domain_incremental", "permuted")
DOMAIN_TRANSFORMS = ("permutation", "rotation")
BOUNDARIES = ("global", "async")
NEVER = np.iinfo(np.int64).max  # deletion round of a sample that is never deleted


@dataclass(frozen=True)
class ClientTaskIndex:
    """Per task, every client's training sample positions, packed CSR-style (bytes per client)."""

    indices: tuple[np.ndarray, ...]  # per task: all clients' positions, client after client
    offsets: tuple[np.ndarray, ...]  # per task: (num_clients + 1,) boundaries into `indices`

    @classmethod
    def pack(cls, per_task: list[list[np.ndarray]]) -> ClientTaskIndex:
        """Pack `per_task[task][client]` index arrays."""
        indices, offsets = [], []
        for per_client in per_task:
            sizes = np.array([len(part) for part in per_client], dtype=np.int64)
            offsets.append(np.concatenate([[0], np.cumsum(sizes)]))
            indices.append(np.concatenate(per_client).astype(np.int64))
        return cls(tuple(indices), tuple(offsets))

    def get(self, client: int, task: int) -> np.ndarray:
        """Return the positions (into the training arrays) client `client` holds for task `task`."""
        start, stop = self.offsets[task][client], self.offsets[task][client + 1]
        return self.indices[task][start:stop]


@dataclass(frozen=True)
class DriftSpan:
    """A drift on a client: from `start`, at a severity that depends on the round and the mode."""

    drift: Drift
    start: int
    mode: str  # sudden | incremental | recurrent
    ramp: int = 1
    until: int | None = None  # recurrent: the original concept returns at this round
    event: int = 0  # timeline index of the drift event

    def severity(self, server_round: int) -> float:
        """0 before the drift and after a recurrent drift ends; ramps up to 1 when incremental."""
        if server_round < self.start or (self.until is not None and server_round >= self.until):
            return 0.0
        if self.mode == "incremental":
            return min(1.0, (server_round - self.start + 1) / self.ramp)
        return 1.0


Concept = tuple[tuple[DriftSpan, float], ...]  # the drifts in force on a client, with severities


@dataclass(frozen=True)
class ClientView:
    """What a client trains on in one round: sample ids, inputs, labels, and each sample's task."""

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    tasks: np.ndarray


@dataclass(frozen=True)
class Scenario:
    """Tasks, the timeline of events, and which training samples each client holds per task."""

    num_clients: int
    rounds: int
    kind: str
    task_classes: tuple[np.ndarray, ...]
    test_indices: tuple[np.ndarray, ...]  # per task: positions into the test arrays
    train: ClientTaskIndex
    timeline: tuple[Event, ...] = ()
    # per client: rounds at which it starts a task, and which task (from the task events)
    stream_rounds: tuple[np.ndarray, ...] = ()
    stream_tasks: tuple[np.ndarray, ...] = ()
    join_round: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    leave_round: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    drifts: tuple[tuple[DriftSpan, ...], ...] = ()
    deletion_round: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    deleted_by_event: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    input_transforms: tuple[dict[str, Any] | None, ...] = ()  # per task (domain-incremental)
    blurry_share: float = 0.0
    blurry_rounds: int = 1
    global_task_starts: dict[int, int] = field(default_factory=dict)  # round -> task, all clients
    seed: int = 0

    # --- tasks ------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        """The number of distinct tasks in the scenario."""
        return len(self.task_classes)

    @property
    def task_incremental(self) -> bool:
        """Whether the task id is known at train and test time (a head per task)."""
        return self.kind == "task_incremental"

    def task_of(self, client: int, server_round: int) -> int:
        """The task client `client` trains on in round `server_round`; -1 before its first task."""
        position = np.searchsorted(self.stream_rounds[client], server_round, side="right") - 1
        return int(self.stream_tasks[client][position]) if position >= 0 else -1

    def previous_task(self, client: int, server_round: int) -> tuple[int, int]:
        """(task before the current one, round the current one started); (-1, start) if none."""
        position = np.searchsorted(self.stream_rounds[client], server_round, side="right") - 1
        start = int(self.stream_rounds[client][position]) if position >= 0 else server_round
        previous = int(self.stream_tasks[client][position - 1]) if position >= 1 else -1
        return previous, start

    def seen_tasks(self, server_round: int) -> list[int]:
        """Every task some client has started by `server_round`."""
        seen = set()
        for rounds, tasks in zip(self.stream_rounds, self.stream_tasks, strict=True):
            seen.update(int(t) for t in tasks[rounds <= server_round])
        return sorted(seen)

    def global_task(self, server_round: int) -> int:
        """The task most available clients train in `server_round` (ties: the lowest)."""
        tasks = [self.task_of(c, server_round) for c in self.available(server_round)]
        if not tasks:
            tasks = [max(self.task_of(c, server_round) for c in range(self.num_clients))]
        values, counts = np.unique(tasks, return_counts=True)
        return int(values[np.argmax(counts)])

    def task_end_rounds(self) -> list[int]:
        """Last round of each global task phase (a task all clients switch to at once)."""
        starts = sorted(self.global_task_starts)
        return [s - 1 for s in starts[1:]] + [self.rounds]

    def is_sequential(self) -> bool:
        """Whether tasks 0, 1, ..., T-1 come once each, in order, for all clients at once (the
        setting in which the task-end accuracy matrix, BWT and FWT are defined)."""
        order = [self.global_task_starts[r] for r in sorted(self.global_task_starts)]
        per_client_events = sum(len(r) for r in self.stream_rounds)
        return order == list(range(self.num_tasks)) and per_client_events == len(order) * len(
            self.stream_rounds
        )

    def train_indices(self, client: int, task: int) -> np.ndarray:
        """Positions into the training arrays of client `client`'s data for task `task`."""
        return self.train.get(client, task)

    # --- availability, deletion, drift --------------------------------------------------------
    def available(self, server_round: int) -> list[int]:
        """Clients that can be sampled in `server_round`: joined, not left, with a task."""
        return [
            c
            for c in range(self.num_clients)
            if self.join_round[c] <= server_round < self.leave_round[c]
            and self.task_of(c, server_round) >= 0
        ]

    def deleted(self, ids: np.ndarray, server_round: int) -> np.ndarray:
        """Bool mask: which of the training sample `ids` are deleted as of `server_round`."""
        return self.deletion_round[ids] <= server_round

    def concept(self, client: int, server_round: int) -> Concept:
        """The drifts in force on `client` in `server_round`, with their severities."""
        spans = self.drifts[client] if self.drifts else ()
        return tuple((s, s.severity(server_round)) for s in spans if s.severity(server_round) > 0)

    # --- data views -----------------------------------------------------------------------
    def client_ids(self, client: int, server_round: int) -> tuple[np.ndarray, np.ndarray]:
        """(sample ids, their tasks) client `client` trains on in `server_round`, deletions
        removed; after a task switch a blurry share of the previous task's data is mixed in."""
        task = self.task_of(client, server_round)
        if task < 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        ids = self.train_indices(client, task)
        tasks = np.full(len(ids), task, dtype=np.int64)
        previous, start = self.previous_task(client, server_round)
        if self.blurry_share > 0 and previous >= 0 and server_round < start + self.blurry_rounds:
            old = self.train_indices(client, previous)
            rng = derive_rng(self.seed, "blurry", client, start)
            count = min(len(old), int(round(self.blurry_share * len(ids))))
            mixed = np.sort(rng.choice(old, count, replace=False))
            ids = np.concatenate([ids, mixed])
            tasks = np.concatenate([tasks, np.full(count, previous, dtype=np.int64)])
        keep = ~self.deleted(ids, server_round)
        return ids[keep], tasks[keep]

    def task_inputs(self, x: np.ndarray, task: int) -> np.ndarray:
        """`x` as task `task` presents it (its domain transform applied, if it has one)."""
        transform = self.input_transforms[task] if self.input_transforms else None
        if transform is None:
            return x
        if transform["kind"] == "permutation":
            return x.reshape(len(x), -1)[:, transform["permutation"]].reshape(x.shape)
        from scipy.ndimage import rotate  # imported here: only rotated-domain runs need scipy

        return rotate(x, transform["degrees"], axes=(-2, -1), reshape=False, order=1)

    def view(
        self,
        x_all: np.ndarray,
        y_all: np.ndarray,
        ids: np.ndarray,
        tasks: np.ndarray,
        concept: Concept,
        split: str = "train",
    ) -> ClientView:
        """Samples `ids` (of tasks `tasks`) as a client under `concept` sees them: each task's
        domain transform, then each drift at its severity."""
        x, y = x_all[ids], y_all[ids]
        for task in np.unique(tasks):
            rows = tasks == task
            if self.input_transforms and self.input_transforms[task] is not None:
                x[rows] = self.task_inputs(x[rows], int(task))
        for span, severity in concept:
            x, y, keep = span.drift.apply(x, y, ids, severity, split=split)
            x, y, ids, tasks = x[keep], y[keep], ids[keep], tasks[keep]
        return ClientView(ids, x, y, tasks)

    def class_mask(self, tasks: np.ndarray, num_classes: int) -> np.ndarray | None:
        """Task-incremental only: (n, num_classes) bool, True for the classes of each row's task."""
        if not self.task_incremental:
            return None
        mask = np.zeros((len(tasks), num_classes), dtype=bool)
        for task in np.unique(tasks):
            mask[np.ix_(tasks == task, self.task_classes[task])] = True
        return mask


# --- building -----------------------------------------------------------------------------------
def _task_classes(cfg: DictConfig, num_classes: int) -> list[np.ndarray]:
    sc = cfg.scenario
    if sc.kind in ("domain_incremental", "permuted"):
        return [np.arange(num_classes)] * sc.num_tasks
    order_rng = derive_rng(cfg.seed, "class-order") if sc.shuffle_classes else None
    return class_incremental_split(
        num_classes,
        sc.num_tasks,
        class_order=list(sc.class_order) if sc.class_order is not None else None,
        rng=order_rng,
    )


def _input_transforms(cfg: DictConfig, dataset: ArrayDataset) -> list[dict[str, Any] | None]:
    sc = cfg.scenario
    if sc.kind not in ("domain_incremental", "permuted"):
        return []
    transform = "permutation" if sc.kind == "permuted" else sc.domain_transform
    if transform not in DOMAIN_TRANSFORMS:
        raise ConfigError(
            f"unknown scenario.domain_transform '{transform}'; "
            f"valid: {', '.join(DOMAIN_TRANSFORMS)}"
        )
    if transform == "rotation" and len(dataset.input_shape) != 3:
        raise ConfigError(
            f"scenario.domain_transform=rotation needs image input (C, H, W); dataset "
            f"'{dataset.name}' has {dataset.input_shape}: use permutation"
        )
    # As FOT's PMNIST and rotated-MNIST protocols: task 0 is the plain input.
    transforms: list[dict[str, Any] | None] = [None]
    width = int(np.prod(dataset.input_shape))
    for t in range(1, sc.num_tasks):
        if transform == "permutation":
            perm = derive_rng(cfg.seed, "permutation", t).permutation(width)
            transforms.append({"kind": "permutation", "permutation": perm})
        else:
            transforms.append({"kind": "rotation", "degrees": t * 180.0 / sc.num_tasks})
    return transforms


def _stream_events(cfg: DictConfig) -> list[dict[str, Any]]:
    """The task events the scenario's stream settings imply (global or per-client boundaries)."""
    sc, rounds = cfg.scenario, cfg.rounds
    stream = list(sc.stream) if sc.stream is not None else list(range(sc.num_tasks))
    bad = [t for t in stream if not 0 <= t < sc.num_tasks]
    if not stream or bad:
        raise ConfigError(
            f"scenario.stream must list tasks in 0..{sc.num_tasks - 1}, got {list(stream)}"
        )
    per_task = sc.rounds_per_task or max(1, rounds // len(stream))
    if sc.boundaries not in BOUNDARIES:
        raise ConfigError(
            f"unknown scenario.boundaries '{sc.boundaries}'; valid: {', '.join(BOUNDARIES)}"
        )
    if sc.boundaries == "global":
        if per_task * (len(stream) - 1) >= rounds:
            raise ConfigError(
                f"{len(stream)} stream entries of {per_task} rounds do not fit in rounds={rounds}"
            )
        return [
            {"round": 1 + k * per_task, "kind": "task", "clients": "all", "task": task}
            for k, task in enumerate(stream)
        ]
    events = []
    span = sc.async_rounds_per_task or [per_task, per_task]
    if len(span) != 2 or not 1 <= span[0] <= span[1]:
        raise ConfigError(f"scenario.async_rounds_per_task must be [low, high], got {list(span)}")
    for client in range(cfg.clients.num):
        rng = derive_rng(cfg.seed, "stream", client)
        start = 1 + int(rng.integers(0, sc.async_start + 1))
        order = list(rng.permutation(stream)) if sc.async_shuffle else stream
        for task in order:
            if start > rounds:
                break
            events.append({"round": start, "kind": "task", "clients": [client], "task": int(task)})
            start += int(rng.integers(span[0], span[1] + 1))
    return events


def _partition(cfg: DictConfig, dataset: ArrayDataset, task_classes: list[np.ndarray]):
    if cfg.clients.partition not in PARTITIONS:
        raise ConfigError(
            f"unknown clients.partition '{cfg.clients.partition}'; valid: {', '.join(PARTITIONS)}"
        )
    per_task, test_indices = [], []
    for task, classes in enumerate(task_classes):
        positions = np.flatnonzero(task_sample_mask(dataset.y_train, classes))
        parts = partition_indices(
            dataset.y_train[positions],
            cfg.clients.num,
            cfg.clients.partition,
            derive_rng(cfg.seed, "partition", task),
            alpha=cfg.clients.alpha,
            shards_per_client=cfg.clients.shards_per_client,
        )
        per_task.append([positions[part] for part in parts])
        test_indices.append(np.flatnonzero(task_sample_mask(dataset.y_test, classes)))
    return ClientTaskIndex.pack(per_task), test_indices


def build_scenario(cfg: DictConfig, dataset: ArrayDataset) -> Scenario:
    """Build the scenario the config describes and validate its whole timeline up front.

    Every random draw derives from `cfg.seed`; a malformed event (unknown kind, a round beyond the
    run, an unknown client, a class not in the dataset, bad drift parameters) raises a one-line
    `ConfigError` naming it before anything runs.
    """
    sc = cfg.scenario
    if sc.kind not in SCENARIOS:
        raise ConfigError(f"unknown scenario.kind '{sc.kind}'; valid: {', '.join(SCENARIOS)}")
    task_classes = _task_classes(cfg, dataset.num_classes)
    transforms = _input_transforms(cfg, dataset)
    train, test_indices = _partition(cfg, dataset, task_classes)
    num_clients, rounds = cfg.clients.num, cfg.rounds

    raw_events = [(f"events[{i}]", e) for i, e in enumerate(_plain(cfg.events))]
    generated = generate_events(
        _plain(cfg.generate),
        rounds=rounds,
        num_clients=num_clients,
        rng_for=lambda i, r: derive_rng(cfg.seed, "generate", i, r),
    )
    raw_events += [(f"generated event {e['kind']!r} at round {e['round']}", e) for e in generated]
    raw_events = [
        (f"scenario stream (task {e['task']})", e) for e in _stream_events(cfg)
    ] + raw_events
    limits = dict(
        rounds=rounds,
        num_clients=num_clients,
        num_classes=dataset.num_classes,
        num_tasks=len(task_classes),
    )
    timeline = build_timeline([parse_event(e, where, **limits) for where, e in raw_events])

    stream_rounds: list[list[int]] = [[] for _ in range(num_clients)]
    stream_tasks: list[list[int]] = [[] for _ in range(num_clients)]
    join_round = np.ones(num_clients, dtype=np.int64)
    leave_round = np.full(num_clients, rounds + 1, dtype=np.int64)
    drifts: list[list[DriftSpan]] = [[] for _ in range(num_clients)]
    deletion_round = np.full(len(dataset.y_train), NEVER, dtype=np.int64)
    deleted_by_event: dict[int, dict[int, np.ndarray]] = {}
    global_starts: dict[int, int] = {}
    all_clients = tuple(range(num_clients))
    for event in timeline:
        where = f"event at round {event.round} ({event.kind})"
        if event.kind == "task":
            for c in event.clients:
                stream_rounds[c].append(event.round)
                stream_tasks[c].append(int(event.params["task"]))
            if event.clients == all_clients:
                global_starts[event.round] = int(event.params["task"])
        elif event.kind == "join":
            join_round[list(event.clients)] = event.round
        elif event.kind == "leave":
            leave_round[list(event.clients)] = np.minimum(
                leave_round[list(event.clients)], event.round
            )
        elif event.kind == "drift":
            params = {k: v for k, v in event.params.items() if k not in DRIFT_EVENT_KEYS}
            drift = make_drift(
                event.params["type"],
                params,
                seed=derive_seed(cfg.seed, "drift", event.index),
                num_classes=dataset.num_classes,
                input_shape=dataset.input_shape,
            )
            span = DriftSpan(
                drift,
                event.round,
                event.params["mode"],
                ramp=int(event.params.get("ramp", 1)),
                until=event.params.get("until"),
                event=event.index,
            )
            for c in event.clients:
                drifts[c].append(span)
        elif event.kind == "delete":
            per_client = _deleted_ids(event, train, dataset, cfg.seed, where)
            for c, ids in per_client.items():
                deletion_round[ids] = np.minimum(deletion_round[ids], event.round)
                if event.params["what"] == "client":
                    leave_round[c] = min(leave_round[c], event.round)
            deleted_by_event[event.index] = per_client
    return Scenario(
        num_clients=num_clients,
        rounds=rounds,
        kind=sc.kind,
        task_classes=tuple(task_classes),
        test_indices=tuple(test_indices),
        train=train,
        timeline=timeline,
        stream_rounds=tuple(np.asarray(r, dtype=np.int64) for r in stream_rounds),
        stream_tasks=tuple(np.asarray(t, dtype=np.int64) for t in stream_tasks),
        join_round=join_round,
        leave_round=leave_round,
        drifts=tuple(tuple(d) for d in drifts),
        deletion_round=deletion_round,
        deleted_by_event=deleted_by_event,
        input_transforms=tuple(transforms),
        blurry_share=float(sc.blurry),
        blurry_rounds=int(sc.blurry_rounds),
        global_task_starts=global_starts,
        seed=cfg.seed,
    )


def _client_ids(train: ClientTaskIndex, client: int) -> np.ndarray:
    """Every training sample client `client` holds, over all tasks."""
    return np.concatenate([train.get(client, t) for t in range(len(train.indices))])


def _deleted_ids(
    event: Event, train: ClientTaskIndex, dataset: ArrayDataset, seed: int, where: str
) -> dict[int, np.ndarray]:
    """The training sample ids a delete event removes, per client."""
    what = event.params["what"]
    per_client: dict[int, np.ndarray] = {}
    for c in event.clients:
        held = _client_ids(train, c)
        if what == "client":
            ids = held
        elif what == "class":
            ids = held[dataset.y_train[held] == event.params["class"]]
        elif "fraction" in event.params:
            rng = derive_rng(seed, "delete", event.index, c)
            ids = rng.choice(
                held, int(round(float(event.params["fraction"]) * len(held))), replace=False
            )
        else:
            requested = np.asarray(event.params["samples"], dtype=np.int64)
            ids = requested[np.isin(requested, held)]
        per_client[c] = np.sort(ids)
    if what == "samples" and "samples" in event.params:
        requested = np.asarray(event.params["samples"], dtype=np.int64)
        claimed = np.concatenate(list(per_client.values()))
        missing = requested[~np.isin(requested, claimed)]
        if len(missing):
            raise ConfigError(
                f"{where}: sample {int(missing[0])} is not held by clients {list(event.clients)}"
            )
    return per_client


def _plain(node: Any) -> list[dict[str, Any]]:
    """Config list of event mappings as plain Python."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else []  # type: ignore[return-value]
