"""engine.vectorize: an actor's clients of a round trained together give the sequential result."""

from __future__ import annotations

import numpy as np
import pytest

import fedcl
from fedcl.engine.vectorize import PROBE_FILE, resolve_vectorize
from fedcl.models import build_model
from tests.engine.runs import run_with_actors

# Task-incremental (class masks), replay, FedProx: everything the vectorized path must cover.
SETTING = [
    "clients.num=6",
    "rounds=6",
    "scenario.kind=task_incremental",
    "scenario.num_tasks=3",
    "clients.partition=dirichlet",
    "train.replay_size=20",
    "train.momentum=0.5",
    "train.batch_size=16",
    "model.hidden=[32]",
    "strategy.name=fedprox",
    "strategy.proximal_mu=0.1",
]


def _final(tmp_path, mode: str, actors: int = 2):
    return fedcl.run(
        None,
        *SETTING,
        f"engine.vectorize={mode}",
        f"engine.num_actors={actors}",
        out=tmp_path / f"{mode}-{actors}",
        progress=False,
    )


def test_vectorized_training_gives_the_sequential_model(tmp_path, ray_session):
    on, off = _final(tmp_path, "on"), _final(tmp_path, "off")
    assert on.summary["vectorized"] and not off.summary["vectorized"]
    # Every reply really came from the batched path (and none from the sequential one).
    assert all(r["train"]["train-vectorized"] == 1.0 for r in on.records)
    assert all(r["train"]["train-vectorized"] == 0.0 for r in off.records)
    for name in off.arrays:
        # float32 rounding over 6 rounds of SGD: sums run in another order under vmap.
        np.testing.assert_allclose(
            on.arrays[name].numpy(), off.arrays[name].numpy(), rtol=1e-4, atol=1e-5
        )
    assert on.summary["deletion_audit"] == off.summary["deletion_audit"]


def test_vectorized_runs_are_the_same_with_one_or_two_actors(tmp_path, ray_session):
    _, one = run_with_actors([*SETTING, "engine.vectorize=on"], tmp_path / "one", 1)
    _, two = run_with_actors([*SETTING, "engine.vectorize=on"], tmp_path / "two", 2)
    assert one == two


def test_auto_keeps_its_decision_and_refuses_what_it_cannot_vectorize(tmp_path):
    model = build_model("mlp", (8,), 4, hidden=(16,))
    common = dict(
        model=model,
        input_shape=(8,),
        num_classes=4,
        batch_size=8,
        clients_per_round=4,
        device="cpu",
        cache=tmp_path,
    )
    mode, why = resolve_vectorize("auto", client_app="fedcl.client.app:app", **common)
    assert mode in ("on", "off") and "probe measured" in why
    assert (tmp_path / PROBE_FILE).is_file()
    # A second run of the same setting reads the decision instead of measuring again.
    assert resolve_vectorize("auto", client_app="fedcl.client.app:app", **common) == (mode, why)
    mode, why = resolve_vectorize("on", client_app="my.app:app", **common)
    assert mode == "off" and "not fedcl's default ClientApp" in why
    dropout = build_model("mlp", (8,), 4, hidden=(16,))
    dropout.features.append(__import__("torch").nn.Dropout(0.5))
    mode, why = resolve_vectorize(
        "on", client_app="fedcl.client.app:app", **{**common, "model": dropout}
    )
    assert mode == "off" and "cannot be vectorized" in why


@pytest.mark.parametrize("value", ["on", "off", "auto"])
def test_vectorize_values_from_yaml_booleans(value):
    from fedcl.config import load_config

    assert load_config(None, [f"engine.vectorize={value}"]).engine.vectorize == value


def test_auto_probes_again_when_steps_would_run_another_way(tmp_path, monkeypatch):
    """A decision measured with batched layers is not reused for a model that would run under
    vmap (or after an upgrade changes that): the way steps run is part of the probe's key."""
    from fedcl.engine import vectorize

    common = dict(
        model=build_model("mlp", (8,), 4, hidden=(16,)),
        input_shape=(8,),
        num_classes=4,
        batch_size=8,
        clients_per_round=4,
        client_app="fedcl.client.app:app",
        device="cpu",
        cache=tmp_path,
    )
    probes = []
    monkeypatch.setattr(vectorize, "vectorization_gain", lambda *a, **k: probes.append(1) or 2.0)
    resolve_vectorize("auto", **common)
    resolve_vectorize("auto", **common)
    assert len(probes) == 1
    monkeypatch.setattr(vectorize, "batched_forward", lambda model: (None, "not a chain"))
    resolve_vectorize("auto", **common)
    assert len(probes) == 2
