"""The Fisher a client sends back is its locally trained model's, as computed here independently
(one autograd pass per example and class), not the received global model's."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord

from fedcl.engine.flower_compat import partition_of
from fedcl.strategies.fisher import FisherMerging
from fedcl.strategies.fisher.client import FISHER_CLIENT
from fedcl.strategies.fisher.math import diagonal_fisher
from fedcl.testing import InProcessGrid

CLIENTS = 2


@pytest.fixture(scope="module")
def grid() -> Iterator[InProcessGrid]:
    overrides = [
        f"clients.num={CLIENTS}",
        "scenario.num_tasks=5",  # task 0: digits 0 and 1, about 145 samples a client
        "model.hidden=[8]",
        "train.epochs=2",
        "train.lr=0.1",
    ]
    grid = InProcessGrid(overrides, extension=FISHER_CLIENT)
    yield grid
    grid.close()


def expected_fisher(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """F = (1/N) sum_n sum_y p(y | x_n) (d log p(y | x_n) / d theta)^2, one gradient at a time."""
    model.eval()
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    for row in torch.from_numpy(x):
        log_p = torch.log_softmax(model(row[None]), dim=1)[0]
        for label in range(len(log_p)):
            grads = torch.autograd.grad(log_p[label], list(params.values()), retain_graph=True)
            weight = log_p[label].exp().item()
            for name, grad in zip(params, grads, strict=True):
                total[name] += weight * grad.double() ** 2
    return {name: (value / len(x)).numpy() for name, value in total.items()}


def test_the_reply_carries_the_fisher_of_the_locally_trained_model(grid: InProcessGrid) -> None:
    strategy = FisherMerging(
        fisher_examples=100_000, min_train_nodes=CLIENTS, min_available_nodes=CLIENTS
    )
    start = grid.initial_arrays()
    replies = grid.send_and_receive(strategy.configure_train(1, start, ConfigRecord(), grid))
    assert len(replies) == CLIENTS
    global_model = grid.new_model()
    for reply in replies:
        client = partition_of(reply.metadata.src_node_id)
        x, _ = grid.runtime.task_data(client, 1, 0)
        trained = grid.new_model()
        trained.load_state_dict(reply.content["arrays"].to_torch_state_dict())
        expected = expected_fisher(trained, x)
        untrained = diagonal_fisher(global_model, torch.from_numpy(x), mode="expected")
        sent = reply.content["fisher"]
        assert set(sent.keys()) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(sent[name].numpy(), value, rtol=1e-4, atol=1e-9)
            # not vacuous: local training changed this layer's Fisher
            assert np.abs(untrained[name].numpy() - value).sum() > 0.1 * np.abs(value).sum(), name
