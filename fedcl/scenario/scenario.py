"""A scenario: the dataset cut into tasks, each task spread over clients, tasks placed on rounds.

The scenario holds index arrays only, never copies of the data: a client's training data for a
task is `x_train[scenario.train_indices(client, task)]`. It is built on the driver, from the
config and seed alone, and shipped once to every actor through the Ray object store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig

from fedcl.errors import ConfigError
from fedcl.scenario.datasets import ArrayDataset
from fedcl.scenario.partition import PARTITIONS, partition_indices
from fedcl.scenario.tasks import class_incremental_split, task_sample_mask
from fedcl.seeding import derive_rng

SCENARIOS = ("class_incremental", "permuted")


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
class Scenario:
    """Tasks, their placement on rounds, and which training samples each client holds per task."""

    num_clients: int
    rounds: int
    task_classes: tuple[np.ndarray, ...]
    test_indices: tuple[np.ndarray, ...]  # per task: positions into the test arrays
    train: ClientTaskIndex
    task_starts: np.ndarray  # (num_tasks,) first round of each task (global boundaries)
    # per task: a permutation of the flattened input features, or None (domain-incremental tasks)
    input_permutations: tuple[np.ndarray | None, ...] = ()

    @property
    def num_tasks(self) -> int:
        """The number of tasks in the stream."""
        return len(self.task_classes)

    def task_of(self, client: int, server_round: int) -> int:
        """The task client `client` trains on in round `server_round` (1-based)."""
        del client  # boundaries are global for now; per-client streams keep this signature
        return int(np.searchsorted(self.task_starts, server_round, side="right") - 1)

    def global_task(self, server_round: int) -> int:
        """The task of round `server_round` under global task boundaries."""
        return self.task_of(0, server_round)

    def train_indices(self, client: int, task: int) -> np.ndarray:
        """Positions into the training arrays of client `client`'s data for task `task`."""
        return self.train.get(client, task)

    def task_inputs(self, x: np.ndarray, task: int) -> np.ndarray:
        """`x` as task `task` presents it (its input permutation applied, if it has one)."""
        perm = self.input_permutations[task] if self.input_permutations else None
        if perm is None:
            return x
        return x.reshape(len(x), -1)[:, perm].reshape(x.shape)

    def task_end_rounds(self) -> list[int]:
        """The last round of each task."""
        return [int(start) - 1 for start in self.task_starts[1:]] + [self.rounds]


def task_starts(rounds: int, num_tasks: int, rounds_per_task: int | None) -> np.ndarray:
    """First round of each task: every `rounds_per_task` rounds, the last task taking the rest."""
    per_task = rounds_per_task if rounds_per_task is not None else rounds // num_tasks
    return 1 + per_task * np.arange(num_tasks, dtype=np.int64)


def build_scenario(cfg: DictConfig, dataset: ArrayDataset) -> Scenario:
    """Build the scenario the config describes; every random draw derives from `cfg.seed`."""
    sc = cfg.scenario
    if sc.kind not in SCENARIOS:
        raise ConfigError(f"unknown scenario.kind '{sc.kind}'; valid: {', '.join(SCENARIOS)}")
    if cfg.clients.partition not in PARTITIONS:
        raise ConfigError(
            f"unknown clients.partition '{cfg.clients.partition}'; valid: {', '.join(PARTITIONS)}"
        )
    permutations: list[np.ndarray | None] = []
    if sc.kind == "permuted":
        # As FOT's PMNIST: every task holds all classes; task 0 is the unpermuted input.
        task_classes = [np.arange(dataset.num_classes)] * sc.num_tasks
        width = int(np.prod(dataset.input_shape))
        permutations = [None] + [
            derive_rng(cfg.seed, "permutation", t).permutation(width)
            for t in range(1, sc.num_tasks)
        ]
    else:
        order_rng = derive_rng(cfg.seed, "class-order") if sc.shuffle_classes else None
        task_classes = class_incremental_split(
            dataset.num_classes,
            sc.num_tasks,
            class_order=list(sc.class_order) if sc.class_order is not None else None,
            rng=order_rng,
        )
    per_task: list[list[np.ndarray]] = []
    test_indices = []
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
    return Scenario(
        num_clients=cfg.clients.num,
        rounds=cfg.rounds,
        task_classes=tuple(task_classes),
        test_indices=tuple(test_indices),
        train=ClientTaskIndex.pack(per_task),
        task_starts=task_starts(cfg.rounds, sc.num_tasks, sc.rounds_per_task),
        input_permutations=tuple(permutations),
    )
