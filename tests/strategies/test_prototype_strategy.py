"""Prototype averaging as a strategy, through fedcl's real client handlers: federated prototypes are
the central class means whatever the partition and reply order, deletions are exact, and the head
predicts the nearest prototype."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

import fedcl
from fedcl.engine.flower_compat import node_id_of
from fedcl.errors import ConfigError
from fedcl.scenario.datasets import load_dataset
from fedcl.strategies import build_strategy
from fedcl.strategies.base import DeletionRequest
from fedcl.strategies.prototypes import PrototypeAveraging
from fedcl.strategies.prototypes.client import PROTOTYPES_CLIENT
from fedcl.strategies.prototypes.math import PrototypeBank
from fedcl.strategies.prototypes.strategy import UNKNOWN_CLASS_BIAS
from fedcl.testing import InProcessGrid

CLASS_INCREMENTAL = [
    "dataset.name=digits",
    "scenario.num_tasks=2",
    "rounds=4",
    "clients.num=5",
    "train.batch_size=16",
    "model.hidden=[32,16]",
]
TASK = 0  # round 1 trains task 0 of 2 (rounds 1-2)


@pytest.fixture(scope="module", params=["iid", "dirichlet", "shards"])
def grid(request):
    grid = InProcessGrid(
        [*CLASS_INCREMENTAL, f"clients.partition={request.param}"], extension=PROTOTYPES_CLIENT
    )
    yield grid
    grid.close()


def frozen_strategy(grid: InProcessGrid) -> tuple[PrototypeAveraging, ArrayRecord]:
    """A strategy whose backbone is the untrained initial model: no partition can change it."""
    strategy = PrototypeAveraging(min_train_nodes=5, min_available_nodes=5)
    strategy.frozen = True
    return strategy, ArrayRecord(grid.new_model().state_dict())


def collect(strategy, grid, arrays, order=None):
    """One round: prototype queries to every node, replies in `order` (a permutation)."""
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    assert {m.metadata.message_type for m in messages} == {"query.prototypes"}
    replies = grid.send_and_receive(messages)
    if order is not None:
        replies = [replies[i] for i in order]
    new, metrics = strategy.aggregate_train(1, replies)
    return new, metrics


def central_bank(grid: InProcessGrid, arrays: ArrayRecord, clients) -> PrototypeBank:
    """The class sums and counts of the union of `clients`' task data, embedded in one batch."""
    model = grid.new_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    positions = np.concatenate([grid.scenario.train_indices(c, TASK) for c in clients])
    with torch.no_grad():
        embeddings = model.embed(torch.from_numpy(grid.dataset.x_train[positions])).double()
    return PrototypeBank.from_embeddings(embeddings.numpy(), grid.dataset.y_train[positions], 10)


def assert_same_prototypes(bank: PrototypeBank, central: PrototypeBank) -> None:
    np.testing.assert_array_equal(bank.counts, central.counts)
    # float32 embeddings of differently sized batches may differ in the last bits
    np.testing.assert_allclose(bank.prototypes(), central.prototypes(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("order", ["sent", "reversed", "shuffled"])
def test_federated_prototypes_equal_central_ones_whatever_partition_and_order(grid, order):
    strategy, arrays = frozen_strategy(grid)
    permutation = {
        "sent": None,
        "reversed": list(range(4, -1, -1)),
        "shuffled": [3, 0, 4, 1, 2],
    }[order]
    _, metrics = collect(strategy, grid, arrays, permutation)
    central = central_bank(grid, arrays, range(5))
    assert_same_prototypes(strategy.global_bank(), central)
    assert metrics["known-classes"] == 5  # task 0 holds digits 0-4
    # asking again replaces each client's bank: nothing is counted twice
    collect(strategy, grid, arrays)
    assert_same_prototypes(strategy.global_bank(), central)


def test_removing_a_client_or_a_class_is_exact(grid):
    strategy, arrays = frozen_strategy(grid)
    collect(strategy, grid, arrays)
    new = strategy.on_delete(
        DeletionRequest(server_round=2, what="client", node_ids=(node_id_of(2),)), arrays, grid
    )
    assert_same_prototypes(strategy.global_bank(), central_bank(grid, arrays, [0, 1, 3, 4]))
    assert new is not None

    strategy.on_delete(
        DeletionRequest(server_round=2, what="class", node_ids=(), classes=(3,)), arrays, grid
    )
    bank = strategy.global_bank()
    central = central_bank(grid, arrays, [0, 1, 3, 4])
    assert bank.counts[3] == 0 and np.all(bank.sums[3] == 0)
    keep = [0, 1, 2, 4]
    np.testing.assert_array_equal(bank.counts[keep], central.counts[keep])
    np.testing.assert_allclose(
        bank.prototypes()[keep], central.prototypes()[keep], rtol=1e-5, atol=1e-6
    )


def test_deleting_samples_recollects_exactly_the_remaining_data(grid):
    strategy, arrays = frozen_strategy(grid)
    collect(strategy, grid, arrays)
    held = grid.scenario.train_indices(1, TASK)
    gone = held[::3]
    deletion_round = grid.scenario.deletion_round
    saved = deletion_round[gone].copy()
    deletion_round[gone] = 2  # the client's store loses them from round 2 on
    try:
        strategy.on_delete(
            DeletionRequest(server_round=2, what="samples", node_ids=(node_id_of(1),)), arrays, grid
        )
    finally:
        deletion_round[gone] = saved
    central = central_bank(grid, arrays, range(5))
    model = grid.new_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    with torch.no_grad():
        removed = model.embed(torch.from_numpy(grid.dataset.x_train[gone])).double().numpy()
    expected = central.without(
        PrototypeBank.from_embeddings(removed, grid.dataset.y_train[gone], 10)
    )
    assert_same_prototypes(strategy.global_bank(), expected)


def test_head_predicts_the_nearest_prototype(grid):
    strategy, arrays = frozen_strategy(grid)
    new, _ = collect(strategy, grid, arrays)
    bank = strategy.global_bank()
    model = grid.new_model()
    model.load_state_dict(new.to_torch_state_dict())
    x = torch.from_numpy(grid.dataset.x_test)
    with torch.no_grad():
        logits = model(x).double()
        embeddings = model.embed(x).double().numpy()
    np.testing.assert_array_equal(logits.argmax(1).numpy(), bank.predict(embeddings))
    assert np.all(np.isfinite(new["head.bias"].numpy()))
    assert np.all(new["head.bias"].numpy()[5:] == np.float32(UNKNOWN_CLASS_BIAS))
    # the backbone is untouched
    for name in arrays:
        if not name.startswith("head."):
            np.testing.assert_array_equal(new[name].numpy(), arrays[name].numpy())


def test_prototype_run_keeps_old_classes(ray_session, tmp_path):
    out = tmp_path / "run"
    overrides = [
        *CLASS_INCREMENTAL,
        "scenario.num_tasks=3",
        "rounds=6",
        "train.epochs=2",
        "strategy.name=prototypes",
        "engine.num_actors=2",
        "log.progress=false",
    ]
    fedcl.run(None, overrides, out=out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train"].get("known-classes") for r in records] == [None, None, 7, 7, 10, 10]
    assert records[2]["train"]["prototype-examples"] < records[4]["train"]["prototype-examples"]
    # class-incremental fine-tuning (FedAvg) scores ~0 on old tasks; prototypes keep them
    final = records[-1]["acc"]
    assert min(final.values()) > 0.4  # chance is 0.1


@pytest.mark.parametrize(
    "spec, words",
    [({"backbone_rounds": 0}, "backbone_rounds"), ({"backbone": 3}, "takes no argument")],
)
def test_bad_arguments_give_one_line_config_errors(spec, words):
    with pytest.raises(ConfigError, match=words) as error:
        build_strategy({"name": "prototypes", **spec}, num_clients=10)
    assert "\n" not in str(error.value)


@pytest.mark.usefixtures("ray_session")
def test_a_class_deleted_mid_run_leaves_the_prototype_head_exactly(tmp_path):
    digits = load_dataset("digits")
    result = fedcl.run(
        None,
        [
            "dataset.name=digits",
            "scenario.num_tasks=3",
            "rounds=6",
            "clients.num=4",
            "engine.num_actors=2",
            "log.progress=false",
            "strategy.name=prototypes",
            "events=[{round: 5, kind: delete, what: class, class: 5}]",
        ],
        out=tmp_path / "run",
    )
    bank = result.strategy.global_bank()
    assert bank.counts[5] == 0
    # every other class of the tasks seen holds all of its training samples, once
    for cls in (4, 6, 7, 8, 9):
        assert bank.counts[cls] == int((digits.y_train == cls).sum())
    bias = result.arrays["head.bias"].numpy()
    assert bias[5] == np.float32(UNKNOWN_CLASS_BIAS)
    assert result.summary["deletion_audit"]["used_after_delete"] == 0
