"""Models build for 1-D and 2-D inputs and learn; local training is seeded and honours its knobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcl.client.training import accuracy, train_local
from fedcl.errors import ConfigError
from fedcl.models import build_model
from fedcl.scenario.datasets import load_dataset


@pytest.mark.parametrize(
    ("dataset", "model"), [("digits", "cnn"), ("mnist1d", "cnn"), ("digits", "mlp")]
)
def test_models_learn_their_dataset(dataset, model):
    data = load_dataset(dataset, **({"num_samples": 2000} if dataset == "mnist1d" else {}))
    net = build_model(model, data.input_shape, data.num_classes, seed=1)
    before = accuracy(net, data.x_test, data.y_test)
    train_local(
        net, data.x_train, data.y_train, epochs=3, batch_size=32, lr=0.05, momentum=0.9, seed=0
    )
    after = accuracy(net, data.x_test, data.y_test)
    assert after > max(0.4, before + 0.2)


def test_same_seed_same_weights_and_global_rng_untouched():
    data = load_dataset("digits")
    state = torch.random.get_rng_state()
    runs = []
    for _ in range(2):
        net = build_model("mlp", data.input_shape, data.num_classes, seed=3)
        stats = train_local(
            net, data.x_train[:200], data.y_train[:200], epochs=1, batch_size=16, lr=0.1, seed=7
        )
        runs.append((net.state_dict(), stats.loss))
    assert runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][0][k], runs[1][0][k]) for k in runs[0][0])
    assert torch.equal(state, torch.random.get_rng_state())


def test_max_steps_and_rows_used():
    data = load_dataset("digits")
    net = build_model("mlp", data.input_shape, data.num_classes)
    stats = train_local(
        net,
        data.x_train[:100],
        data.y_train[:100],
        epochs=5,
        batch_size=10,
        lr=0.1,
        seed=0,
        max_steps=3,
    )
    assert stats.steps == 3 and len(stats.rows_used) == 30
    assert np.all(np.diff(stats.rows_used) > 0)


def test_proximal_term_keeps_weights_closer_to_the_start():
    data = load_dataset("digits")
    start = build_model("mlp", data.input_shape, data.num_classes)
    moved = {}
    for mu in (0.0, 10.0):
        net = build_model("mlp", data.input_shape, data.num_classes)
        train_local(
            net,
            data.x_train,
            data.y_train,
            epochs=1,
            batch_size=32,
            lr=0.05,
            seed=0,
            proximal_mu=mu,
        )
        moved[mu] = sum(
            float((p - q).detach().pow(2).sum())
            for p, q in zip(net.parameters(), start.parameters(), strict=True)
        )
    assert moved[10.0] < 0.5 * moved[0.0]


def test_unknown_model_is_refused():
    with pytest.raises(ConfigError, match="unknown model.name 'resnet'; valid: mlp, cnn"):
        build_model("resnet", (1, 8, 8), 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_a_gpu_matches_the_cpu_and_returns_a_cpu_model():
    data = load_dataset("digits")
    nets = {}
    for device in ("cpu", "cuda"):
        net = build_model("mlp", data.input_shape, data.num_classes, seed=2)
        train_local(
            net, data.x_train, data.y_train, epochs=1, batch_size=32, lr=0.05, seed=0, device=device
        )
        nets[device] = net
    for (name, cpu), gpu in zip(
        nets["cpu"].state_dict().items(), nets["cuda"].state_dict().values(), strict=True
    ):
        assert gpu.device.type == "cpu"
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4, msg=name)
