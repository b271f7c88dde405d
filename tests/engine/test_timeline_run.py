"""The timeline in real runs: deletion audit with replay, async streams, drift-aware evaluation,
and same seed => same events and metrics whatever the number of actors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fedcl
from fedcl.config import load_config
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.scenario import build_scenario
from tests.engine.runs import read_jsonl, run_with_actors

pytestmark = pytest.mark.usefixtures("ray_session")

BASE = ["clients.num=6", "rounds=8", "engine.num_actors=2", "log.progress=false"]


def trained_samples(out: Path) -> dict[int, dict[int, np.ndarray]]:
    """round -> client -> sample ids it trained on, from the run folder."""
    rounds = {}
    for path in sorted((out / "trained_samples").glob("round_*.npz")):
        with np.load(path) as data:
            rounds[int(path.stem.split("_")[1])] = {
                int(k.split("_")[1]): data[k] for k in data.files
            }
    return rounds


def test_deleted_samples_are_never_trained_on_after_deletion_even_with_replay(tmp_path):
    events = (
        "events=["
        "{round: 4, kind: delete, clients: [0], what: samples, fraction: 0.5},"
        "{round: 5, kind: delete, what: class, class: 0},"
        "{round: 6, kind: delete, clients: [3], what: client}]"
    )
    overrides = [*BASE, "scenario.num_tasks=4", "train.replay_size=40", events]
    out = tmp_path / "run"
    result = fedcl.run(None, overrides, out=out)
    scenario = build_scenario(load_config(None, overrides), load_dataset("digits"))
    deletion_round = scenario.deletion_round
    used = trained_samples(out)
    used_before = 0
    for server_round, per_client in used.items():
        for ids in per_client.values():
            assert not (deletion_round[ids] <= server_round).any()
            used_before += int((deletion_round[ids] < np.iinfo(np.int64).max).sum())
    assert used_before > 0  # the deleted samples were trained on before their deletion
    # replay really brought back old tasks' samples in later rounds
    late = np.concatenate(list(used[8].values()))
    assert (
        np.isin(late, scenario.train_indices(1, 0)) | np.isin(late, scenario.train_indices(2, 0))
    ).any()
    audit = result.summary["deletion_audit"]
    assert audit["used_after_delete"] == 0
    assert audit["deleted"] == int((deletion_round < np.iinfo(np.int64).max).sum()) > 0
    assert 3 not in {c for r in range(6, 9) for c in used.get(r, {})}  # the client left
    logged = [e for e in read_jsonl(out / "events.jsonl") if e["kind"] == "delete"]
    assert [e["round"] for e in logged] == [4, 5, 6]


def test_async_clients_train_on_their_own_tasks(tmp_path):
    overrides = [
        *BASE,
        "rounds=10",
        "scenario.num_tasks=3",
        "scenario.boundaries=async",
        "scenario.async_start=2",
        "scenario.async_rounds_per_task=[2,4]",
    ]
    out = tmp_path / "run"
    fedcl.run(None, overrides, out=out)
    scenario = build_scenario(load_config(None, overrides), load_dataset("digits"))
    digits = load_dataset("digits")
    mixed_round = False
    for server_round, per_client in trained_samples(out).items():
        tasks = {c: scenario.task_of(c, server_round) for c in per_client}
        mixed_round |= len(set(tasks.values())) > 1
        for client, ids in per_client.items():
            classes = scenario.task_classes[tasks[client]]
            assert np.isin(digits.y_train[ids], classes).all()
    assert mixed_round  # some round had clients on different tasks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bwt"] is None and summary["acc"] is not None


def test_same_seed_same_events_and_metrics_with_one_or_two_actors(tmp_path):
    overrides = [
        "clients.num=6",
        "rounds=6",
        "scenario.num_tasks=2",
        "clients.participation=0.7",
        "log.progress=false",
        "generate=[{kind: drift, rate: 0.4, type: label_swap, pairs: [[0, 1]],"
        " clients_per_event: 2}]",
    ]
    outputs = {a: run_with_actors(overrides, tmp_path / f"a{a}", a) for a in (1, 2)}
    assert outputs[1] == outputs[2]
    events, records = outputs[1]
    assert any(e["kind"] == "drift" for e in events)
    assert all(r["online"] == 4 for r in records)  # 0.7 of 6 clients, rounded


def test_evaluation_follows_drift_per_concept_and_client(tmp_path):
    event = (
        "events=[{round: 3, kind: drift, clients: [0, 1, 2], type: label_swap, pairs: [[0, 1]]}]"
    )
    out = tmp_path / "run"
    fedcl.run(None, [*BASE, "rounds=5", "scenario.num_tasks=1", event], out=out)
    records = read_jsonl(out / "metrics.jsonl")
    assert "acc_by_concept" not in records[1]
    drifted = records[3]
    concepts = drifted["acc_by_concept"]
    assert set(concepts) == {"original", "drift1@1.00"}
    assert set(drifted["client_acc"]) == {str(c) for c in range(6)}
    # acc is the client-weighted mean over concepts (3 clients each)
    expected = (concepts["original"]["0"] + concepts["drift1@1.00"]["0"]) / 2
    assert drifted["acc"]["0"] == pytest.approx(expected)
