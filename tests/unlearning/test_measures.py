"""The membership-inference AUC: about 0.5 on data a model never saw, high on data it memorised;
and the L2 distance between models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedcl.scenario.datasets import load_dataset
from fedcl.unlearning.measures import l2_distance, mia_auc, sample_losses


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _fit(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, adam: bool = False) -> None:
    params = model.parameters()
    optimizer = torch.optim.Adam(params, lr=0.01) if adam else torch.optim.SGD(params, lr=0.1)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


@pytest.fixture
def one_thread():
    """Small full-batch fits are slower on many threads of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_auc_is_about_half_on_unseen_data_and_high_on_memorised_data(one_thread):
    digits = load_dataset("digits")
    x, y = digits.x_train.reshape(len(digits.y_train), -1), digits.y_train
    test_x, test_y = digits.x_test.reshape(len(digits.y_test), -1), digits.y_test
    # Trained on the first 600 samples; samples 600-900 are as unseen as the test data.
    model = _model()
    _fit(model, x[:600], y[:600], epochs=100)
    unseen, _ = sample_losses(model, x[600:900], y[600:900])
    test, _ = sample_losses(model, test_x, test_y)
    assert abs(mia_auc(unseen, test) - 0.5) < 0.07
    # A forget set of 60 samples with random labels, memorised: its losses give it away.
    rng = np.random.default_rng(0)
    forget_y = rng.integers(0, 10, 60)
    memorised = _model()
    _fit(memorised, x[900:960], forget_y, epochs=150, adam=True)
    members, _ = sample_losses(memorised, x[900:960], forget_y)
    test, _ = sample_losses(memorised, test_x, test_y)
    assert mia_auc(members, test) > 0.9


def test_auc_edge_cases_and_l2_distance():
    assert mia_auc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert mia_auc(np.array([0.5]), np.array([0.5])) == 0.5  # a tie counts half
    assert np.isnan(mia_auc(np.zeros(0), np.ones(3)))
    a = ArrayRecord(
        {"w": Array(np.array([1.0, 2.0], np.float32)), "b": Array(np.zeros(1, np.float32))}
    )
    b = ArrayRecord(
        {"w": Array(np.array([1.0, 5.0], np.float32)), "b": Array(np.full(1, 4.0, np.float32))}
    )
    assert l2_distance(a, b) == 5.0 and l2_distance(a, a) == 0.0
