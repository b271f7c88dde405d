"""The benchmark workload as a Flower app, for Flower's own simulation engine (`run_simulation`).

The `ServerApp` runs stock `flwr.serverapp.strategy.FedAvg` and, like fedcl, evaluates the global
model after every round (Flower's `evaluate_fn`); the time of each evaluation's end marks a round's
end. The `ClientApp` trains the received model on the client's samples with the same SGD as the
reference loops. Both read the workload and the data folder from environment variables set by
`configure` before Flower starts Ray, so the actors (which inherit the environment) see them too.
"""

from __future__ import annotations

import json
import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedcl.bench.loops import sgd_epochs, slice_batches
from fedcl.bench.workload import BenchData, Workload, build_bench_model, load_data

WORKLOAD_ENV = "FEDCL_BENCH_WORKLOAD"  # the workload, as JSON
DATA_ENV = "FEDCL_BENCH_DATA"  # the folder `save_data` wrote

# What the ServerApp measured, read by the worker once `run_simulation` returns.
RESULTS: dict[str, Any] = {}

client_app = ClientApp()
server_app = ServerApp()


def configure(workload: Workload, data_folder: Path) -> None:
    """Point the apps (in this process and in the Ray actors started after this) at the data."""
    os.environ[WORKLOAD_ENV] = json.dumps(workload.to_dict())
    os.environ[DATA_ENV] = str(data_folder)
    _setup.cache_clear()
    RESULTS.clear()


@lru_cache(maxsize=1)
def _setup() -> tuple[Workload, BenchData]:
    """The workload and its data (memory-mapped), loaded once per process."""
    torch.set_num_threads(1)
    workload = Workload.from_dict(json.loads(os.environ[WORKLOAD_ENV]))
    return workload, load_data(Path(os.environ[DATA_ENV]), mmap=True)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's client data; reply with the new weights."""
    workload, data = _setup()
    client = int(context.node_config["partition-id"])
    model = build_bench_model(workload, data.input_shape, data.num_classes)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = torch.tensor(data.x[client]), torch.tensor(data.y[client])
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.lr)
    sgd_epochs(model, optimizer, slice_batches(x, y, workload.batch_size), workload.epochs)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(y)}),
        }
    )
    return Message(content, reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg for the workload's rounds; record when each round (train + evaluation) ended."""
    workload, data = _setup()
    model = build_bench_model(workload, data.input_shape, data.num_classes)
    x_test, y_test = torch.tensor(data.x_test), torch.tensor(data.y_test)
    strategy = FedAvg(
        fraction_train=workload.per_round / workload.num_clients,
        fraction_evaluate=0.0,
        min_train_nodes=workload.per_round,
        # Round 1 waits until every node is registered (that belongs to start-up).
        min_available_nodes=workload.num_clients,
    )
    marks: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            correct = (model(x_test).argmax(1) == y_test).float().mean().item()
        marks.append(time.perf_counter())
        return MetricRecord({"accuracy": correct})

    initial = ArrayRecord(model.state_dict())
    strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=workload.rounds, evaluate_fn=evaluate
    )
    import ray  # Flower's Ray backend started it in this process

    RESULTS.update(
        marks=marks,
        end=time.perf_counter(),
        cpus=float(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else None,
        model_bytes=sum(initial[key].numpy().nbytes for key in initial),
    )
