"""Building a scenario from the config: tasks and their classes, the per-task domain transforms,
each task's data split over the clients, and the timeline folded into per-client state.

Every random draw derives from `cfg.seed` and a purpose key, never from global state, so the
driver builds the same scenario on every run of a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fedcl.errors import ConfigError
from fedcl.scenario.concepts import ClientDrifts, DriftSpan
from fedcl.scenario.datasets import ArrayDataset
from fedcl.scenario.deletion import Deletions, deleted_ids
from fedcl.scenario.events import Event, build_timeline, generate_events, parse_event
from fedcl.scenario.packed import ClientTaskIndex
from fedcl.scenario.partition import PARTITIONS, partition_packed
from fedcl.scenario.streams import TaskStreams
from fedcl.scenario.tasks import class_incremental_split, task_sample_mask
from fedcl.scenario.validation import stratified_holdout
from fedcl.seeding import derive_rng

if TYPE_CHECKING:
    from fedcl.scenario.scenario import Scenario

SCENARIOS = ("class_incremental", "task_incremental", "domain_incremental", "permuted")
DOMAIN_TRANSFORMS = ("permutation", "rotation")
BOUNDARIES = ("global", "async")


def build_scenario(cfg: DictConfig, dataset: ArrayDataset) -> Scenario:
    """Build the scenario the config describes and validate its whole timeline up front.

    Every random draw derives from `cfg.seed`; a malformed event (unknown kind, a round beyond the
    run, an unknown client, a class not in the dataset, bad drift parameters) raises a one-line
    `ConfigError` naming it before anything runs.
    """
    # Imported here: scenario.py re-exports this function, so it cannot be imported at the top.
    from fedcl.scenario.scenario import Scenario

    sc = cfg.scenario
    if sc.kind not in SCENARIOS:
        raise ConfigError(f"unknown scenario.kind '{sc.kind}'; valid: {', '.join(SCENARIOS)}")
    task_classes = _task_classes(cfg, dataset.num_classes)
    transforms = _input_transforms(cfg, dataset)
    train, test_indices, validation_indices = _partition(cfg, dataset, task_classes)
    timeline = _timeline(cfg, dataset, len(task_classes))
    state = _TimelineState.start(cfg.clients.num, cfg.rounds, len(dataset.y_train))
    for event in timeline:
        if event.kind == "task":
            state.task(event)
        elif event.kind in ("join", "leave"):
            state.join_or_leave(event)
        elif event.kind == "drift":
            span = DriftSpan.from_event(
                event,
                seed=cfg.seed,
                num_classes=dataset.num_classes,
                input_shape=dataset.input_shape,
            )
            state.drift(event, span)
        elif event.kind == "delete":
            where = f"event at round {event.round} ({event.kind})"
            state.delete(event, deleted_ids(event, train, dataset.y_train, cfg.seed, where))
    return Scenario(
        num_clients=cfg.clients.num,
        rounds=cfg.rounds,
        kind=sc.kind,
        task_classes=tuple(task_classes),
        test_indices=tuple(test_indices),
        train=train,
        streams=TaskStreams.build(
            cfg.clients.num, state.task_clients, state.task_rounds, state.task_ids
        ),
        join_round=state.join_round,
        leave_round=state.leave_round,
        drifts=ClientDrifts.build(state.spans, state.span_clients),
        deletion_round=state.deletions.rounds,
        timeline=timeline,
        deleted_by_event=state.deletions.by_event,
        input_transforms=tuple(transforms),
        blurry_share=float(sc.blurry),
        blurry_rounds=int(sc.blurry_rounds),
        global_task_starts=state.global_starts,
        seed=cfg.seed,
        validation_indices=tuple(validation_indices),
    )


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


def _partition(
    cfg: DictConfig, dataset: ArrayDataset, task_classes: list[np.ndarray]
) -> tuple[ClientTaskIndex, list[np.ndarray], list[np.ndarray]]:
    """Each task's training samples split over the clients, after its validation share
    (`dataset.validation`, stratified, drawn from (seed, task)) is held out; and per task the
    test positions and the held-out training positions (empty without a validation split)."""
    if cfg.clients.partition not in PARTITIONS:
        raise ConfigError(
            f"unknown clients.partition '{cfg.clients.partition}'; valid: {', '.join(PARTITIONS)}"
        )
    indices, offsets, test_indices, validation_indices = [], [], [], []
    for task, classes in enumerate(task_classes):
        positions = np.flatnonzero(task_sample_mask(dataset.y_train, classes))
        held = stratified_holdout(
            dataset.y_train[positions],
            float(cfg.dataset.validation),
            derive_rng(cfg.seed, "validation", task),
        )
        validation_indices.append(positions[held])
        positions = positions[~held]
        packed, bounds = partition_packed(
            dataset.y_train[positions],
            cfg.clients.num,
            cfg.clients.partition,
            derive_rng(cfg.seed, "partition", task),
            alpha=cfg.clients.alpha,
            shards_per_client=cfg.clients.shards_per_client,
        )
        indices.append(positions[packed])
        offsets.append(bounds)
        test_indices.append(np.flatnonzero(task_sample_mask(dataset.y_test, classes)))
    return ClientTaskIndex(tuple(indices), tuple(offsets)), test_indices, validation_indices


def _timeline(cfg: DictConfig, dataset: ArrayDataset, num_tasks: int) -> tuple[Event, ...]:
    """Every event of the run, validated and in timeline order: the task stream's, then those
    written in the config, then the generated ones (the order ties keep). A drift's parameters
    are checked here too, for the config's events and for each generator (drawn or not), so an
    error names the event: `events[i]` or `generate[i]`."""
    num_clients, rounds = cfg.clients.num, cfg.rounds
    limits = dict(
        rounds=rounds,
        num_clients=num_clients,
        num_classes=dataset.num_classes,
        num_tasks=num_tasks,
    )

    def parse_whole(raw: dict[str, Any], where: str) -> Event:
        event = parse_event(raw, where, **limits)
        if event.kind == "drift":
            try:
                DriftSpan.from_event(
                    event,
                    seed=cfg.seed,
                    num_classes=dataset.num_classes,
                    input_shape=dataset.input_shape,
                )
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        return event

    written = [parse_whole(e, f"events[{i}]") for i, e in enumerate(_plain(cfg.events))]
    generated = generate_events(
        _plain(cfg.generate),
        rounds=rounds,
        num_clients=num_clients,
        rng_for=lambda i, r: derive_rng(cfg.seed, "generate", i, r),
        check=parse_whole,
    )
    stream = [
        parse_event(e, f"scenario stream (task {e['task']})", **limits) for e in _stream_events(cfg)
    ]
    # Drawn from checked generators: only their round and clients are new.
    drawn = [
        parse_event(e, f"generated event {e['kind']!r} at round {e['round']}", **limits)
        for e in generated
    ]
    return build_timeline(stream + written + drawn)


@dataclass
class _TimelineState:
    """What the timeline's events leave on the clients, gathered in timeline order."""

    num_clients: int
    join_round: np.ndarray
    leave_round: np.ndarray
    deletions: Deletions
    task_clients: list[np.ndarray] = field(default_factory=list)
    task_rounds: list[int] = field(default_factory=list)
    task_ids: list[int] = field(default_factory=list)
    spans: list[DriftSpan] = field(default_factory=list)
    span_clients: list[np.ndarray] = field(default_factory=list)
    global_starts: dict[int, int] = field(default_factory=dict)

    @classmethod
    def start(cls, num_clients: int, rounds: int, num_samples: int) -> _TimelineState:
        """Before any event: every client joined from round 1, none leaves, nothing deleted."""
        return cls(
            num_clients,
            join_round=np.ones(num_clients, dtype=np.int64),
            leave_round=np.full(num_clients, rounds + 1, dtype=np.int64),
            deletions=Deletions.none(num_samples),
        )

    def task(self, event: Event) -> None:
        """The event's clients start its task."""
        self.task_clients.append(_client_array(event.clients))
        self.task_rounds.append(event.round)
        self.task_ids.append(int(event.params["task"]))
        if len(event.clients) == self.num_clients:  # clients are distinct: this is everyone
            self.global_starts[event.round] = int(event.params["task"])

    def join_or_leave(self, event: Event) -> None:
        """The event's clients join (from its round) or leave (the earliest leave counts)."""
        clients = _client_array(event.clients)
        if event.kind == "join":
            self.join_round[clients] = event.round
        else:
            self.leave_round[clients] = np.minimum(self.leave_round[clients], event.round)

    def drift(self, event: Event, span: DriftSpan) -> None:
        """The event's clients come under `span`."""
        self.spans.append(span)
        self.span_clients.append(_client_array(event.clients))

    def delete(self, event: Event, per_client: dict[int, np.ndarray]) -> None:
        """Samples `per_client` are deleted from the event's round; a deleted client leaves."""
        self.deletions.record(event, per_client)
        if event.params["what"] == "client":
            for c in per_client:
                self.leave_round[c] = min(self.leave_round[c], event.round)


def _client_array(clients: tuple[int, ...] | range) -> np.ndarray:
    if isinstance(clients, range):
        return np.arange(clients.start, clients.stop, clients.step, dtype=np.int64)
    return np.asarray(clients, dtype=np.int64)


def _plain(node: Any) -> list[dict[str, Any]]:
    """Config list of event mappings as plain Python."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else []  # type: ignore[return-value]
