"""The benchmark workload: what is trained, on which data, and how every engine gets the same data.

One `Workload` fixes the data set (MNIST-1D, `samples_per_client` training samples per client),
the model, the local training (SGD, batch, epochs) and the federation (clients registered, sampled
per round, rounds). `prepare_data` generates the data with fedcl's own loader and cuts it into
fedcl's own client partition, so the reference loops and Flower's engine train every client on the
very samples fedcl's clients train on; `save_data` / `load_data` hand them to worker processes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

# MNIST-1D keeps 80 % of `num_samples` for training (the package's split).
_TRAIN_SHARE = 0.8


@dataclass(frozen=True)
class ModelSpec:
    """A fedcl model (`fedcl.models.build_model` arguments) under a short benchmark name."""

    name: str  # fedcl model name: mlp | cnn
    hidden: tuple[int, ...] = (128, 128)
    channels: tuple[int, ...] = (16, 32)
    label: str = ""


MODELS: dict[str, ModelSpec] = {
    "mlp256": ModelSpec("mlp", hidden=(256, 256), label="MLP 40-256-256-10"),
    "mlp128": ModelSpec("mlp", hidden=(128, 128), label="MLP 40-128-128-10"),
    "cnn": ModelSpec("cnn", channels=(16, 32), label="CNN 1d 16-32"),
}


@dataclass(frozen=True)
class Workload:
    """One federated training workload, identical for every engine that runs it."""

    num_clients: int
    per_round: int
    model: str  # a key of MODELS
    rounds: int
    samples_per_client: int = 64
    batch_size: int = 16
    epochs: int = 1
    lr: float = 0.05
    seed: int = 0
    max_test: int = 1000  # evaluation set of fedcl's (and Flower's) per-round evaluation
    # The reference loops are cheap: they run at least this many client updates (more rounds).
    min_reference_updates: int = 0

    @property
    def model_spec(self) -> ModelSpec:
        """The model this workload trains."""
        return MODELS[self.model]

    @property
    def num_samples(self) -> int:
        """MNIST-1D's `num_samples` option giving exactly `samples_per_client` per client."""
        return round(self.num_clients * self.samples_per_client / _TRAIN_SHARE)

    @property
    def key(self) -> str:
        """The name `fedcl bench --workloads` picks it by, e.g. '1000-50-mlp256'."""
        return f"{self.num_clients}-{self.per_round}-{self.model}"

    @property
    def label(self) -> str:
        """A short human-readable name, e.g. '1000/50 MLP 40-256-256-10'."""
        return f"{self.num_clients}/{self.per_round} {self.model_spec.label}"

    def reference_rounds(self) -> int:
        """Rounds the lean and naive loops run: `rounds`, or more to reach the update minimum."""
        needed = -(-self.min_reference_updates // self.per_round) + 1
        return max(self.rounds, needed)

    def to_dict(self) -> dict[str, Any]:
        """The workload as JSON-ready values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Workload:
        """Inverse of `to_dict`."""
        return cls(**values)


def fedcl_config(workload: Workload, num_actors: int | None) -> dict[str, Any]:
    """The fedcl config (a mapping for `fedcl.run`) that runs `workload` with `num_actors` actors
    (None: as many as the machine fits)."""
    spec = workload.model_spec
    n, k = workload.num_clients, workload.per_round
    return {
        "seed": workload.seed,
        "rounds": workload.rounds,
        "name": "bench",
        "dataset": {
            "name": "mnist1d",
            "options": {"num_samples": workload.num_samples, "max_test": workload.max_test},
        },
        "scenario": {"kind": "class_incremental", "num_tasks": 1},
        "clients": {"num": n, "partition": "iid"},
        "model": {"name": spec.name, "hidden": list(spec.hidden), "channels": list(spec.channels)},
        "train": {
            "batch_size": workload.batch_size,
            "lr": workload.lr,
            "epochs": workload.epochs,
        },
        "strategy": {
            "name": "fedavg",
            "fraction_train": k / n,
            "min_train_nodes": k,
            "min_available_nodes": k,
        },
        "engine": {"num_actors": num_actors},
        "log": {"progress": False, "trained_samples": False},
        # Neither reference loop nor Flower keeps resumable state; fedcl's checkpoints (on by
        # default, held to checkpoint.max_overhead of the run time) are left out of the race.
        "checkpoint": {"every": 0, "every_s": 0},
    }


@dataclass(frozen=True)
class BenchData:
    """Every client's training samples, stacked, plus the evaluation set.

    `x` has shape (clients, samples_per_client, *input_shape), each client's rows in the one fixed
    order every engine's local epoch goes through (batches are consecutive rows).
    """

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    generate_s: float = 0.0  # seconds fedcl's loader took to generate the data set

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(self.x.shape[2:])


def prepare_data(workload: Workload) -> BenchData:
    """Generate the workload's MNIST-1D with fedcl's loader and cut it into fedcl's partition.

    Client c gets exactly the samples fedcl's client c trains on, in an order drawn once per
    client from the workload seed.
    """
    from fedcl.config import load_config
    from fedcl.scenario.datasets import load_dataset
    from fedcl.scenario.scenario import build_scenario
    from fedcl.seeding import derive_rng

    started = time.perf_counter()
    dataset = load_dataset(
        "mnist1d",
        seed=workload.seed,
        num_samples=workload.num_samples,
        max_test=workload.max_test,
    )
    generate_s = time.perf_counter() - started
    scenario = build_scenario(load_config(fedcl_config(workload, 1)), dataset)
    rows = np.stack([scenario.train_indices(c, 0) for c in range(workload.num_clients)])
    if rows.shape[1] != workload.samples_per_client:
        raise ValueError(
            f"fedcl's partition gave {rows.shape[1]} samples per client, expected "
            f"{workload.samples_per_client}"
        )
    order = derive_rng(workload.seed, "bench-order").permuted(rows, axis=1)
    return BenchData(
        x=np.ascontiguousarray(dataset.x_train[order]),
        y=np.ascontiguousarray(dataset.y_train[order]),
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        num_classes=dataset.num_classes,
        generate_s=generate_s,
    )


def synthetic_data(
    num_clients: int, samples_per_client: int, input_shape: Sequence[int], seed: int = 0
) -> BenchData:
    """Random inputs and labels in the benchmark's layout (for tests of the loops themselves)."""
    rng = np.random.default_rng(seed)
    shape = (num_clients, samples_per_client, *input_shape)
    return BenchData(
        x=rng.standard_normal(shape, dtype=np.float32),
        y=rng.integers(0, 10, size=(num_clients, samples_per_client), dtype=np.int64),
        x_test=rng.standard_normal((32, *input_shape), dtype=np.float32),
        y_test=rng.integers(0, 10, size=32, dtype=np.int64),
        num_classes=10,
    )


def save_data(data: BenchData, folder: Path) -> None:
    """Write `data` as .npy files (workers memory-map them) plus a small meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("x", "y", "x_test", "y_test"):
        np.save(folder / f"{name}.npy", getattr(data, name))
    meta = {"num_classes": data.num_classes, "generate_s": data.generate_s}
    (folder / "meta.json").write_text(json.dumps(meta))


def load_data(folder: Path, *, mmap: bool = False) -> BenchData:
    """Read what `save_data` wrote; with `mmap` the arrays are memory-mapped, read on demand."""
    meta = json.loads((folder / "meta.json").read_text())
    mode = "r" if mmap else None
    arrays = {
        n: np.load(folder / f"{n}.npy", mmap_mode=mode) for n in ("x", "y", "x_test", "y_test")
    }
    return BenchData(**arrays, num_classes=meta["num_classes"], generate_s=meta["generate_s"])


def sample_clients(workload: Workload, server_round: int) -> np.ndarray:
    """The clients the reference loops train in `server_round` (seeded, without replacement)."""
    from fedcl.seeding import derive_rng

    rng = derive_rng(workload.seed, "bench-sample", server_round)
    return np.sort(rng.choice(workload.num_clients, workload.per_round, replace=False))


def build_bench_model(
    workload: Workload, input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """The workload's model with fedcl's initial weights for the workload seed."""
    from fedcl.models import build_model
    from fedcl.seeding import derive_seed

    spec = workload.model_spec
    return build_model(
        spec.name,
        tuple(input_shape),
        num_classes,
        hidden=spec.hidden,
        channels=spec.channels,
        seed=derive_seed(workload.seed, "init"),
    )
