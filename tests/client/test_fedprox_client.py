"""Clients honour FedProx's `proximal-mu`: with a large mu their update shrinks toward the global
model, against FedAvg's from the same start on the same data (real ClientApp, in process)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAvg, FedProx

from fedcl.engine.flower_compat import partition_of
from fedcl.testing import InProcessGrid

CLIENTS = 3


@pytest.fixture(scope="module")
def grid() -> Iterator[InProcessGrid]:
    grid = InProcessGrid(
        [
            f"clients.num={CLIENTS}",
            "scenario.num_tasks=1",
            "model.hidden=[16]",
            "train.epochs=3",
            "train.lr=0.05",
        ]
    )
    yield grid
    grid.close()


def update_norms(grid: InProcessGrid, strategy: FedAvg, start: ArrayRecord) -> dict[int, float]:
    """Each client's distance from `start` after one round of local training."""
    messages = strategy.configure_train(1, start, ConfigRecord(), grid)
    replies: list[Message] = grid.send_and_receive(messages)
    assert len(replies) == CLIENTS and not any(r.has_error() for r in replies)
    initial = {name: start[name].numpy() for name in start}
    norms = {}
    for reply in replies:
        arrays = reply.content["arrays"]
        squared = sum(((arrays[n].numpy() - initial[n]) ** 2).sum() for n in initial)
        norms[partition_of(reply.metadata.src_node_id)] = float(np.sqrt(squared))
    return norms


def test_a_large_proximal_mu_shrinks_every_update_toward_the_global_model(
    grid: InProcessGrid,
) -> None:
    start = grid.initial_arrays()
    every = {"fraction_train": 1.0, "min_train_nodes": CLIENTS, "min_available_nodes": CLIENTS}
    free = update_norms(grid, FedAvg(**every), start)
    held = update_norms(grid, FedProx(proximal_mu=10.0, **every), start)
    slight = update_norms(grid, FedProx(proximal_mu=0.5, **every), start)
    for client in range(CLIENTS):
        assert free[client] > 0
        # mu·lr = 0.5: each step pulls half the way back to the start, so the update is a
        # fraction of FedAvg's; a small mu shrinks it a little, and no more than a large one
        assert held[client] < 0.5 * free[client]
        assert held[client] < slight[client] < free[client]
