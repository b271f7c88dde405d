"""Vectorized virtual clients train exactly as train_local does, client by client."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedcl.client import vectorized
from fedcl.client.training import TrainStats, train_local
from fedcl.client.vectorized import (
    ClientBatchData,
    VectorizedResult,
    can_vectorize,
    train_clients_vectorized,
    vectorization_gain,
)
from fedcl.models import build_model
from fedcl.scenario.datasets import load_dataset

# vmap sums in another order than train_local: float32 agrees to the tolerance that
# train_clients_vectorized documents, float64 shows the arithmetic is otherwise the same.
ATOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# One empty client, one smaller than a batch, one exactly a batch, uneven last batches.
SIZES = (23, 0, 3, 8, 17)
BATCH = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: a second intra-op thread only adds spinning on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_model(
    kind: str, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, tuple[int, ...], int]:
    """A small model of `kind` with widths and input shape drawn from `seed`."""
    rng = np.random.default_rng(seed)
    classes = int(rng.integers(4, 8))
    if kind == "mlp":
        shape = (int(rng.integers(3, 12)),)
        hidden = tuple(int(w) for w in rng.integers(4, 24, size=rng.integers(1, 3)))
        model = build_model("mlp", shape, classes, hidden=hidden, seed=seed)
    else:
        shape = (2, 7, 6) if kind == "cnn2d" else (3, 13)
        model = build_model("cnn", shape, classes, channels=(3, 5), seed=seed)
    return model.to(dtype), shape, classes


def make_clients(
    shape: tuple[int, ...],
    classes: int,
    seed: int,
    sizes: tuple[int, ...] = SIZES,
    masked: bool = False,
    dtype: torch.dtype = torch.float32,
) -> list[ClientBatchData]:
    """Clients with random data; masked: each sample's task (first or second half of the
    classes) limits its softmax, tasks mixed within a client, one client left unmasked."""
    rng = np.random.default_rng(seed)
    clients = []
    for k, n in enumerate(sizes):
        x = torch.from_numpy(rng.normal(size=(n, *shape))).to(dtype).numpy()
        half = classes // 2
        task = rng.integers(0, 2, size=n)
        low, high = np.where(task == 0, 0, half), np.where(task == 0, half, classes)
        y = (low + rng.integers(0, 1 << 20, size=n) % (high - low)).astype(np.int64)
        mask = None
        if masked and k != len(sizes) - 1:
            columns = np.arange(classes)
            mask = (columns >= low[:, None]) & (columns < high[:, None])
        clients.append(ClientBatchData(x, y, seed=1000 * seed + k, class_mask=mask))
    return clients


def train_sequentially(
    model: nn.Module, clients: list[ClientBatchData], **knobs
) -> list[tuple[dict, TrainStats]]:
    """train_local on a fresh copy of `model` per client."""
    out = []
    for client in clients:
        local = copy.deepcopy(model)
        stats = train_local(
            local, client.x, client.y, seed=client.seed, class_mask=client.class_mask, **knobs
        )
        out.append((local.state_dict(), stats))
    return out


def assert_same_training(
    got: list[VectorizedResult], expected: list[tuple[dict, TrainStats]]
) -> None:
    assert len(got) == len(expected)
    for result, (state, stats) in zip(got, expected, strict=True):
        assert list(result.state) == list(state)
        for key in state:
            assert result.state[key].device.type == "cpu"
            atol = ATOL[state[key].dtype]
            torch.testing.assert_close(result.state[key], state[key], atol=atol, rtol=0)
        assert result.stats.steps == stats.steps
        assert result.stats.examples == stats.examples
        assert np.array_equal(result.stats.rows_used, stats.rows_used)
        assert result.stats.rows_used.dtype == stats.rows_used.dtype
        assert result.stats.loss == pytest.approx(stats.loss, abs=atol)


KNOBS = {
    "plain": {"epochs": 1, "lr": 0.1},
    "momentum_and_weight_decay": {"epochs": 1, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01},
    "fedprox": {"epochs": 1, "lr": 0.1, "momentum": 0.5, "proximal_mu": 0.3},
    "class_masks": {"epochs": 1, "lr": 0.1, "masked": True},
    "max_steps": {"epochs": 3, "lr": 0.1, "momentum": 0.9, "max_steps": 3},
    "two_epochs": {"epochs": 2, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.001},
}


@pytest.fixture(params=["batched", "vmap"])
def stepping(request, monkeypatch):
    """Both ways a step runs: batched layers (`fedcl.client.batched`, what fedcl's MLP and CNN
    get) and vmap over functional_call (any other model), forced by hiding the batched forward."""
    if request.param == "vmap":
        monkeypatch.setattr(vectorized, "batched_forward", lambda model: (None, "forced"))
    return request.param


@pytest.mark.parametrize("kind", ["mlp", "cnn2d", "cnn1d"])
@pytest.mark.parametrize("case", list(KNOBS))
@pytest.mark.parametrize(
    ("seed", "dtype"), [(0, torch.float32), (1, torch.float32), (2, torch.float64)]
)
def test_matches_train_local_client_by_client(kind, case, seed, dtype, stepping):
    knobs = dict(KNOBS[case])
    masked = knobs.pop("masked", False)
    model, shape, classes = random_model(kind, seed, dtype)
    before = copy.deepcopy(model.state_dict())
    clients = make_clients(shape, classes, seed, masked=masked, dtype=dtype)
    got = train_clients_vectorized(model, clients, batch_size=BATCH, **knobs)
    assert_same_training(got, train_sequentially(model, clients, batch_size=BATCH, **knobs))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_empty_client_comes_back_unchanged_with_zero_steps():
    model, shape, classes = random_model("mlp", 3)
    got = train_clients_vectorized(
        model, make_clients(shape, classes, 3), epochs=1, batch_size=BATCH, lr=0.1
    )
    empty = got[SIZES.index(0)]
    assert empty.stats.steps == 0 and empty.stats.examples == 0 and empty.stats.loss == 0.0
    assert len(empty.stats.rows_used) == 0
    assert all(torch.equal(empty.state[k], v) for k, v in model.state_dict().items())


def test_no_clients_or_only_empty_ones():
    model, shape, classes = random_model("mlp", 4)
    assert train_clients_vectorized(model, [], epochs=1, batch_size=BATCH, lr=0.1) == []
    clients = make_clients(shape, classes, 4, sizes=(0, 0))
    got = train_clients_vectorized(model, clients, epochs=1, batch_size=BATCH, lr=0.1)
    assert [r.stats.steps for r in got] == [0, 0]


def test_fedavg_of_vectorized_equals_fedavg_of_sequential():
    model, shape, classes = random_model("cnn2d", 5)
    clients = make_clients(shape, classes, 5)
    knobs = {"epochs": 2, "batch_size": BATCH, "lr": 0.05, "momentum": 0.9}
    got = train_clients_vectorized(model, clients, **knobs)
    expected = train_sequentially(model, clients, **knobs)
    weights = [len(c.y) for c in clients]

    def fedavg(states):
        return {
            key: sum(w * s[key] for w, s in zip(weights, states, strict=True)) / sum(weights)
            for key in states[0]
        }

    averaged, reference = fedavg([r.state for r in got]), fedavg([s for s, _ in expected])
    for key in reference:
        torch.testing.assert_close(averaged[key], reference[key], atol=ATOL[torch.float32], rtol=0)


class FrozenAndBuffer(nn.Module):
    """A frozen layer and a constant buffer next to trainable layers, one weight in two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(5, 6).requires_grad_(False)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 6))
        self.middle = nn.Linear(6, 6)
        self.tied = nn.Linear(6, 6)
        self.tied.weight = self.middle.weight
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.middle(torch.relu(self.frozen(x)) * self.scale))
        return self.head(torch.relu(self.tied(hidden)))


def test_frozen_parameters_buffers_and_tied_names_pass_through():
    torch.manual_seed(0)
    model = FrozenAndBuffer()
    clients = make_clients((5,), 4, 6)
    knobs = {"epochs": 1, "batch_size": BATCH, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
    got = train_clients_vectorized(model, clients, **knobs)
    assert_same_training(got, train_sequentially(model, clients, **knobs))
    trained = got[0].state
    assert torch.equal(trained["frozen.weight"], model.frozen.weight)
    assert torch.equal(trained["scale"], model.scale)
    assert torch.equal(trained["tied.weight"], trained["middle.weight"])
    assert not torch.equal(trained["middle.weight"], model.middle.weight)


def test_global_rng_and_training_mode_untouched():
    model, shape, classes = random_model("mlp", 7)
    model.eval()
    state = torch.random.get_rng_state()
    train_clients_vectorized(
        model, make_clients(shape, classes, 7), epochs=1, batch_size=BATCH, lr=0.1
    )
    assert torch.equal(state, torch.random.get_rng_state())
    assert not model.training


class DataDependent(nn.Module):
    """A forward with Python control flow on tensor values: vmap cannot run it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if out.sum() > 0 else -out


def test_can_vectorize():
    for kind, shape in (("mlp", (10,)), ("cnn", (1, 8, 8)), ("cnn", (2, 12))):
        model = build_model(kind, shape, 5)
        assert can_vectorize(model) is None
        assert can_vectorize(model, shape) is None
    dropout = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.2))
    batch_norm = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    assert "Dropout" in can_vectorize(dropout)
    assert "BatchNorm1d" in can_vectorize(batch_norm)
    shared = nn.Sequential()
    shared.first = shared.second = nn.Linear(3, 3)
    assert "two names" in can_vectorize(shared)
    with pytest.raises(ValueError, match="two names"):
        train_clients_vectorized(shared, [], epochs=1, batch_size=1, lr=0.1)
    assert can_vectorize(DataDependent()) is None  # no input shape: no probe
    assert "probe" in can_vectorize(DataDependent(), (3,))


def test_vectorization_gain_is_a_finite_positive_ratio():
    model = build_model("mlp", (12,), 4, hidden=(16,))
    gain = vectorization_gain(model, (12,), 4, batch_size=4, clients=3, steps=2)
    assert isinstance(gain, float) and math.isfinite(gain) and gain > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vectorized_on_a_gpu_matches_the_cpu_and_returns_cpu_weights():
    data = load_dataset("digits")
    model = build_model("mlp", data.input_shape, data.num_classes, seed=3)
    clients = [
        ClientBatchData(data.x_train[k::4][:50], data.y_train[k::4][:50], seed=k) for k in range(4)
    ]
    results = {
        device: train_clients_vectorized(
            model, clients, epochs=1, batch_size=16, lr=0.05, momentum=0.5, device=device
        )
        for device in ("cpu", "cuda")
    }
    for cpu, gpu in zip(results["cpu"], results["cuda"], strict=True):
        for name, value in gpu.state.items():
            assert value.device.type == "cpu"
            torch.testing.assert_close(value, cpu.state[name], rtol=1e-3, atol=1e-4, msg=name)
