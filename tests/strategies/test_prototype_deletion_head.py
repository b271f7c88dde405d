"""After each kind of deletion, the head the prototype strategy returns is the nearest-prototype
head of the data that remains, recomputed here from scratch (W = 2P, b = -|p|^2; classes without
data W = 0 and a bias that never wins), and the backbone is untouched."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord

from fedcl.engine.flower_compat import node_id_of
from fedcl.strategies.base import DeletionRequest
from fedcl.strategies.prototypes import PrototypeAveraging
from fedcl.strategies.prototypes.client import PROTOTYPES_CLIENT
from fedcl.testing import InProcessGrid

CLIENTS, TASK, CLASSES = 4, 0, 10


@pytest.fixture(scope="module")
def grid() -> Iterator[InProcessGrid]:
    overrides = [
        "scenario.num_tasks=2",  # task 0: digits 0-4
        "rounds=4",
        f"clients.num={CLIENTS}",
        "model.hidden=[16,8]",
    ]
    grid = InProcessGrid(overrides, extension=PROTOTYPES_CLIENT)
    yield grid
    grid.close()


def remaining_prototypes(
    grid: InProcessGrid,
    arrays: ArrayRecord,
    held: dict[int, np.ndarray],
    deleted_class: int | None = None,
) -> np.ndarray:
    """(classes, dim) class means of the samples `held` still holds (NaN rows: no sample)."""
    model = grid.new_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    positions = np.concatenate(list(held.values()))
    labels = grid.dataset.y_train[positions]
    if deleted_class is not None:
        positions, labels = positions[labels != deleted_class], labels[labels != deleted_class]
    with torch.no_grad():
        embedded = model.embed(torch.from_numpy(grid.dataset.x_train[positions])).double().numpy()
    means = np.full((CLASSES, embedded.shape[1]), np.nan)
    for label in np.unique(labels):
        means[label] = embedded[labels == label].mean(axis=0)
    return means


def assert_head_is_nearest_prototype(
    new: ArrayRecord, arrays: ArrayRecord, means: np.ndarray
) -> None:
    known = ~np.isnan(means[:, 0])
    weight, bias = new["head.weight"].numpy(), new["head.bias"].numpy()
    np.testing.assert_allclose(weight[known], 2 * means[known], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bias[known], -(means[known] ** 2).sum(axis=1), rtol=1e-5, atol=1e-6)
    assert np.all(weight[~known] == 0)
    assert np.all(bias[~known] < -1e20)  # a class without data never wins
    for name in arrays:
        if not name.startswith("head."):
            np.testing.assert_array_equal(new[name].numpy(), arrays[name].numpy())


def test_the_head_returned_after_each_deletion_is_the_remaining_datas(grid: InProcessGrid) -> None:
    strategy = PrototypeAveraging(min_train_nodes=CLIENTS, min_available_nodes=CLIENTS)
    strategy.frozen = True  # the backbone is the initial model
    arrays = ArrayRecord(grid.new_model().state_dict())
    messages = strategy.configure_train(1, arrays, ConfigRecord(), grid)
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    held = {c: grid.scenario.train_indices(c, TASK) for c in range(CLIENTS)}
    # The clients' stores lose deleted samples as a run's delete events make them (by round).
    deletion_round = grid.scenario.deletion_round
    saved = deletion_round.copy()
    try:
        # a client leaves with its data
        deletion_round[held[2]] = 2
        new = strategy.on_delete(
            DeletionRequest(server_round=2, what="client", node_ids=(node_id_of(2),)),
            arrays,
            grid,
        )
        del held[2]
        assert_head_is_nearest_prototype(new, arrays, remaining_prototypes(grid, arrays, held))

        # a class is deleted everywhere
        deletion_round[grid.dataset.y_train == 3] = 2
        new = strategy.on_delete(
            DeletionRequest(server_round=2, what="class", node_ids=(), classes=(3,)), arrays, grid
        )
        means = remaining_prototypes(grid, arrays, held, deleted_class=3)
        assert np.isnan(means[3, 0])
        assert_head_is_nearest_prototype(new, arrays, means)

        # a client deletes a third of its samples (its bank is collected again)
        gone = held[1][::3]
        deletion_round[gone] = np.minimum(deletion_round[gone], 3)
        new = strategy.on_delete(
            DeletionRequest(server_round=3, what="samples", node_ids=(node_id_of(1),)),
            arrays,
            grid,
        )
        held[1] = np.setdiff1d(held[1], gone)
        means = remaining_prototypes(grid, arrays, held, deleted_class=3)
        assert_head_is_nearest_prototype(new, arrays, means)
    finally:
        deletion_round[:] = saved
