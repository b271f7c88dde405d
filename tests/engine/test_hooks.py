"""The round loop calls a continual strategy's hooks with what each event carries."""

from __future__ import annotations

import numpy as np
import pytest

import fedcl
from fedcl.config import load_config
from fedcl.engine.events import apply_events, client_task_ends
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.scenario import build_scenario
from fedcl.strategies import build_strategy


def test_hooks_receive_task_drift_and_deletion_events():
    overrides = [
        "clients.num=4",
        "rounds=6",
        "scenario.num_tasks=2",
        "strategy.target=tests.engine.hook_strategy.RecordingFedAvg",
        "events=[{round: 2, kind: drift, clients: [1], type: noise},"
        " {round: 5, kind: delete, what: class, class: 0, clients: [0, 2]}]",
    ]
    cfg = load_config(None, overrides)
    scenario = build_scenario(cfg, load_dataset("digits"))
    strategy = build_strategy(dict(cfg.strategy), cfg.clients.num)
    for server_round in range(1, 7):
        apply_events(scenario, server_round, strategy, arrays=None, grid=None)
    calls = strategy.calls
    assert calls[:5] == [("client_task_start", 1, 1000 + c, 0) for c in range(4)] + [
        ("task_start", 1, 0)
    ]
    assert ("drift", 2, "noise", (1001,)) in calls
    assert ("task_start", 4, 1) in calls
    delete = [c for c in calls if c[0] == "delete"]
    assert len(delete) == 1
    _, server_round, what, classes, sizes = delete[0]
    assert (server_round, what, classes) == (5, "class", (0,))
    digits = load_dataset("digits")
    for node, size in sizes.items():
        held = np.concatenate([scenario.train_indices(node - 1000, t) for t in range(2)])
        assert size == int((digits.y_train[held] == 0).sum()) > 0


@pytest.mark.usefixtures("ray_session")
def test_task_hooks_run_at_the_boundaries_of_a_real_run(tmp_path):
    result = fedcl.run(
        None,
        [
            "clients.num=4",
            "rounds=5",
            "scenario.num_tasks=2",
            "engine.num_actors=1",
            "log.progress=false",
            "strategy.target=tests.engine.hook_strategy.RecordingFedAvg",
        ],
        out=tmp_path / "run",
    )
    boundaries = [c for c in result.strategy.calls if c[0] in ("task_start", "task_end")]
    assert boundaries == [
        ("task_start", 1, 0),
        ("task_end", 2, 0),
        ("task_start", 3, 1),
        ("task_end", 5, 1),
    ]
    client_ends = [c[1:] for c in result.strategy.calls if c[0] == "client_task_end"]
    assert client_ends == [(2, 1000 + c, 0) for c in range(4)] + [
        (5, 1000 + c, 1) for c in range(4)
    ]


def test_per_client_task_ends_follow_each_clients_stream():
    cfg = load_config(
        None,
        [
            "clients.num=5",
            "rounds=12",
            "scenario.num_tasks=3",
            "scenario.boundaries=async",
            "scenario.async_start=3",
            "scenario.async_rounds_per_task=[2,4]",
            "events=[{round: 7, kind: leave, clients: [4]}]",
        ],
    )
    scenario = build_scenario(cfg, load_dataset("digits"))
    ends = {r: client_task_ends(scenario, r) for r in range(1, 13)}
    for client in range(5):
        mine = [(r, t) for r, pairs in ends.items() for c, t in pairs if c == client]
        trained = [(r, scenario.task_of(client, r)) for r in range(1, 13)]
        trained = [(r, t) for r, t in trained if t >= 0 and r < scenario.leave_round[client]]
        # a task ends exactly where the next round trains something else (or nothing)
        expected = [
            (r, t)
            for i, (r, t) in enumerate(trained)
            if i + 1 == len(trained) or trained[i + 1][1] != t or trained[i + 1][0] != r + 1
        ]
        assert mine == expected
    assert (6, 4) in [(r, c) for r, pairs in ends.items() for c, _ in pairs]  # leaves at 7
