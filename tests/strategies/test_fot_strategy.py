"""FOT as a strategy: projected aggregates, orthonormal growing bases, threshold extremes, and an
end-to-end fedcl run whose bases grow at task ends."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

import fedcl
from fedcl.engine.flower_compat import assign_message_id, set_server_identity
from fedcl.errors import ConfigError
from fedcl.models import build_model
from fedcl.strategies import build_strategy
from fedcl.strategies.fot import FOT
from fedcl.strategies.fot.client import FOT_CLIENT
from fedcl.strategies.fot.keys import BASIS_METRIC_PREFIX
from fedcl.strategies.fot.math import layer_inputs
from fedcl.testing import InProcessGrid

ATOL = 1e-5


class Nodes:
    """The part of a Grid FedAvg's sampling uses."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def reply(request: Message, arrays: dict[str, np.ndarray], num_examples: int) -> Message:
    assign_message_id(request)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v.astype(np.float32)) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples}),
        }
    )
    return Message(content, reply_to=request)


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))
    return q.double()


def assert_orthonormal(basis: torch.Tensor) -> None:
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    torch.testing.assert_close(basis.T @ basis, eye, atol=1e-10, rtol=0)


@pytest.fixture
def model_arrays():
    set_server_identity(run_id=5)
    model = build_model("cnn", (1, 8, 8), 10, channels=[4, 6], seed=3)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "weighted"])
def test_aggregated_update_is_orthogonal_to_every_stored_basis(model_arrays, uniform):
    strategy = FOT(uniform_weights=uniform)
    global_arrays = ArrayRecord({k: Array(v) for k, v in model_arrays.items()})
    layers = strategy.layer_names(global_arrays)
    assert layers == ["features.0", "features.3", "head"]  # convs and the shared head
    for i, layer in enumerate(layers):
        d = model_arrays[f"{layer}.weight"][0].size
        strategy.bases[layer] = orthonormal(d, d // 2, seed=i)
    messages = list(
        strategy.configure_train(1, global_arrays, ConfigRecord(), Nodes([1000, 1001, 1002]))
    )
    rng = np.random.default_rng(0)
    counts = [10, 30, 60]
    locals_ = [
        {k: v + rng.normal(0, 0.1, v.shape) for k, v in model_arrays.items()} for _ in messages
    ]
    replies = [reply(m, w, n) for m, w, n in zip(messages, locals_, counts, strict=True)]
    new, metrics = strategy.aggregate_train(1, replies)

    weights = np.ones(3) / 3 if uniform else np.array(counts) / sum(counts)
    for name, before in model_arrays.items():
        after = new[name].numpy().astype(np.float64)
        average = sum(
            w * local[name].astype(np.float32) for w, local in zip(weights, locals_, strict=True)
        )
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in strategy.bases:
            update = (after - before).reshape(before.shape[0], -1)
            basis = strategy.bases[layer]
            assert np.abs(update @ basis.numpy()).max() < ATOL
            # what is left is the average's update in the complement of the basis
            full = (average - before).reshape(before.shape[0], -1)
            complement = full - (full @ basis.numpy()) @ basis.numpy().T
            np.testing.assert_allclose(update, complement, atol=ATOL)
            assert np.abs(update).max() > 1e-3  # not projected to nothing
        else:  # biases are plain averages
            np.testing.assert_allclose(after, average, atol=1e-6)
    for layer in layers:
        assert metrics[BASIS_METRIC_PREFIX + layer] == strategy.bases[layer].shape[1]


def test_without_bases_fot_is_uniform_fedavg(model_arrays):
    strategy = FOT()
    global_arrays = ArrayRecord({k: Array(v) for k, v in model_arrays.items()})
    messages = list(strategy.configure_train(1, global_arrays, ConfigRecord(), Nodes([1000, 1001])))
    locals_ = [{k: v + i for k, v in model_arrays.items()} for i in (1.0, 2.0)]
    new, _ = strategy.aggregate_train(
        1, [reply(m, w, n) for m, w, n in zip(messages, locals_, [1, 9], strict=True)]
    )
    for name, before in model_arrays.items():
        np.testing.assert_allclose(new[name].numpy(), before + 1.5, atol=1e-6)


PERMUTED = [
    "dataset.name=digits",
    "scenario.kind=permuted",
    "scenario.num_tasks=3",
    "rounds=6",
    "clients.num=4",
    "train.epochs=1",
    "train.batch_size=16",
    "model.hidden=[32,32]",
]


@pytest.fixture(scope="module")
def permuted_grid():
    grid = InProcessGrid(PERMUTED, extension=FOT_CLIENT)
    yield grid
    grid.close()


def run_rounds(strategy: FOT, grid: InProcessGrid, rounds, arrays: ArrayRecord) -> ArrayRecord:
    """The round loop's calls for `rounds`, with on_task_end at each task's last round."""
    ends = set(grid.scenario.task_end_rounds())
    for server_round in rounds:
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        if server_round in ends:
            task = grid.scenario.global_task(server_round)
            arrays = strategy.on_task_end(server_round, task, arrays, grid) or arrays
    return arrays


def test_bases_grow_orthonormal_at_task_ends_and_real_updates_avoid_them(permuted_grid):
    strategy = FOT(min_train_nodes=4, min_available_nodes=4)
    arrays = ArrayRecord(permuted_grid.new_model().state_dict())
    arrays = run_rounds(strategy, permuted_grid, [1, 2], arrays)  # task 0 ends at round 2
    sizes = {layer: basis.shape[1] for layer, basis in strategy.bases.items()}
    assert set(sizes) == {"features.1", "features.3", "head"}
    assert all(size > 0 for size in sizes.values())
    for basis in strategy.bases.values():
        assert_orthonormal(basis)

    before = {name: arrays[name].numpy() for name in arrays}
    kept = {layer: basis.clone() for layer, basis in strategy.bases.items()}
    arrays = run_rounds(strategy, permuted_grid, [3, 4], arrays)  # task 1, ends at round 4
    for layer, basis in kept.items():
        update = arrays[f"{layer}.weight"].numpy() - before[f"{layer}.weight"]
        assert np.abs(update.astype(np.float64) @ basis.numpy()).max() < ATOL
        assert np.abs(update).max() > 1e-4
        grown = strategy.bases[layer]
        assert_orthonormal(grown)
        assert grown.shape[1] >= basis.shape[1]
        torch.testing.assert_close(grown[:, : basis.shape[1]], basis, atol=1e-12, rtol=0)
    assert sum(b.shape[1] for b in strategy.bases.values()) > sum(sizes.values())


def central_activations(grid: InProcessGrid, arrays: ArrayRecord, task: int, server_round: int):
    model = grid.new_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    xs = [
        grid.scenario.task_inputs(grid.dataset.x_train[grid.scenario.train_indices(c, task)], task)
        for c in range(grid.cfg.clients.num)
    ]
    x = torch.from_numpy(np.concatenate(xs))
    return layer_inputs(model, x, ["features.1", "features.3", "head"])


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_threshold_extremes_give_empty_and_full_rank_bases(permuted_grid, threshold):
    strategy = FOT(threshold=threshold, min_train_nodes=4, min_available_nodes=4)
    arrays = run_rounds(
        strategy, permuted_grid, [1, 2], ArrayRecord(permuted_grid.new_model().state_dict())
    )
    if threshold == 0.0:
        assert strategy.bases == {}  # every basis empty: FOT is FedAvg
        return
    activations = central_activations(permuted_grid, arrays, task=0, server_round=2)
    for layer, a in activations.items():
        rank = int(torch.linalg.matrix_rank(a.double()))
        assert strategy.bases[layer].shape[1] == rank, layer
    # digits have pixels that are 0 in every image, so the input rank is below 64
    assert activations["features.1"].shape[0] == 64 > strategy.bases["features.1"].shape[1] > 40


def test_fot_run_completes_and_its_bases_grow_at_task_ends(ray_session, tmp_path):
    out = tmp_path / "run"
    result = fedcl.run(
        None,
        [*PERMUTED, "strategy.name=fot", "engine.num_actors=2", "log.progress=false"],
        out=out,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sizes = [
        sum(v for k, v in r["train"].items() if k.startswith(BASIS_METRIC_PREFIX)) for r in records
    ]
    # train metrics come from aggregation, before the task-end expansion of the same round
    assert sizes[:2] == [0, 0]
    assert sizes[2] == sizes[3] > 0
    assert sizes[4] == sizes[5] > sizes[3]
    bases = result.strategy.bases
    assert sum(b.shape[1] for b in bases.values()) > sizes[5]  # grown again at the last task end
    for basis in bases.values():
        assert_orthonormal(basis)


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"threshold": 1.5}, "threshold"),
        ({"projection": "cauchy"}, "projection"),
        ({"sketch_factor": 0}, "sketch_factor"),
        ({"activation_clients": "some"}, "activation_clients"),
        ({"treshold": 0.9}, "takes no argument 'treshold'"),
    ],
)
def test_bad_arguments_give_one_line_config_errors(spec, words):
    with pytest.raises(ConfigError, match=words) as error:
        build_strategy({"name": "fot", **spec}, num_clients=10)
    assert "\n" not in str(error.value)
