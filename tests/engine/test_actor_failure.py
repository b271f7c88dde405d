"""Actor failure: a dead client actor is replaced, its clients move with their state, their work of
the round is retried, and the run ends with the metrics of an uninterrupted one. Past the retry
bound the clients fail the round, listed in `failures`, and the run goes on.

The runs have two tasks of two rounds and replay buffers, so a client that lost its state would
train round 3 (the first of task 1) without replaying task 0, and its train count would restart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

import fedcl
from fedcl.client import replay
from fedcl.config import DEFAULT_APP, load_config, to_container
from fedcl.engine.actor import ActorFactory, kill_actors
from fedcl.engine.checkpoint import Snapshot, write_checkpoint
from fedcl.engine.flower_compat import make_run, node_id_of, set_server_identity
from fedcl.engine.grid import RayGrid
from fedcl.engine.loop import actor_factory
from fedcl.engine.record_codec import encode_records
from fedcl.engine.recovery import ActorRecovery
from fedcl.metrics.system import MEASURED_RECORD_KEYS
from fedcl.models import model_from_config
from fedcl.protocol import STATE_KEY
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.scenario import build_scenario
from tests.engine.runs import read_jsonl
from tests.engine.test_grid import train_messages

REPO = Path(__file__).resolve().parents[2]
RUN = [
    "dataset.name=digits",
    "clients.num=4",
    "engine.num_actors=2",  # actor 0 serves clients 0 and 2
    "rounds=4",
    "scenario.num_tasks=2",
    "train.replay_size=20",
    "model.hidden=[32]",
    "train.batch_size=16",
    "engine.vectorize=off",
    "log.progress=false",
    "strategy.target=tests.engine.actor_killer:KillsActor",
]
EVERY_ROUND = ["checkpoint.every=1", "checkpoint.max_overhead=0"]
EVERY_2 = ["checkpoint.every=2", "checkpoint.max_overhead=0"]
NO_CHECKPOINTS = ["checkpoint.every=0", "checkpoint.every_s=0"]
# Fields of a metrics.jsonl line that differ between an interrupted and an uninterrupted run.
HANG_S = 300  # a run that has not ended by then hangs
UNCOMPARED = ("round_s", "train_s", "actor_replacements", *MEASURED_RECORD_KEYS)


def run_records(out: Path, overrides: list[str]) -> tuple[list[dict], dict]:
    """Run `RUN` with `overrides` into `out`: (metrics.jsonl lines, summary)."""
    result = fedcl.run(None, [*RUN, *overrides], out=out)
    return read_jsonl(out / "metrics.jsonl"), result.summary


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in UNCOMPARED} for r in records]


def replacements(records: list[dict]) -> dict[int, list[dict]]:
    """round -> the actor replacements its record reports."""
    return {r["round"]: r["actor_replacements"] for r in records if "actor_replacements" in r}


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory) -> list[dict]:
    records, _ = run_records(tmp_path_factory.mktemp("uninterrupted") / "run", NO_CHECKPOINTS)
    assert all(not r["failures"] for r in records)
    return records


# (kill, checkpoints, round of the kill, how the two moved clients' state comes back, and from
# which checkpoint round)
CASES = {
    # ray.kill before round 3; the checkpoint of round 2 holds both clients' state.
    "ray_kill-checkpoints": ("ray_kill", EVERY_ROUND, 3, "checkpoint", 2),
    # ... without checkpoints: rebuilt from the rounds they trained in (1 and 2).
    "ray_kill-no_checkpoints": ("ray_kill", NO_CHECKPOINTS, 3, "rebuilt", None),
    # SIGKILL of the actor's process before round 4; the checkpoint of round 2 is older than
    # their training in round 3: its state, brought forward over round 3.
    "sigkill-stale_checkpoint": ("sigkill", EVERY_2, 4, "rebuilt", 2),
    # client 2 SIGKILLs its process in the middle of round 3's call (after it trained, and after
    # client 0 if it came first): what they did in the dead call is forgotten, and redone.
    "sigkill_in_call-no_checkpoints": ("in_call", NO_CHECKPOINTS, 3, "rebuilt", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_actor_is_replaced_and_the_run_ends_as_an_uninterrupted_one(
    case, uninterrupted, tmp_path
):
    how, checkpoints, kill_round, restored, checkpoint_round = CASES[case]
    marker = tmp_path / "died"
    kill = [
        f"strategy.kill_round={kill_round}",
        f"strategy.how={how}",
        "strategy.client=2",
        f"strategy.marker={marker}",
    ]
    records, summary = run_records(tmp_path / "run", [*checkpoints, *kill])

    assert comparable(records) == comparable(uninterrupted)
    assert summary["status"] == "completed" and summary["client_failures"] == 0
    (report,) = replacements(records)[kill_round]
    assert report["actor"] == 0 and report["clients"] == [0, 2] and report["num_clients"] == 2
    assert report["state"] == {"empty": 0, "checkpoint": 0, "rebuilt": 0, "lost": 0} | {restored: 2}
    assert report["checkpoint_round"] == checkpoint_round
    assert report["attempt"] == 0 and report["resent"] is True
    assert report["cause"].startswith("ActorDiedError")
    assert list(replacements(records)) == [kill_round]  # one replacement, in that round only
    assert marker.exists() == (how == "in_call")


@pytest.mark.slow  # starts a second Ray node: outside CI (-m slow)
def test_two_node_cluster_loses_a_node_and_the_run_ends_on_the_other(uninterrupted, tmp_path):
    """A two-node cluster loses the node of actor 0 before round 3 (the run is in its own
    process: it starts its own Ray cluster)."""
    out = tmp_path / "run"
    kill = ["strategy.kill_round=3", "strategy.how=remove_node", *EVERY_ROUND]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.engine.two_node_run", str(out), *RUN, *kill],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert comparable(records) == comparable(uninterrupted)
    reports = replacements(records)[3]
    # Both actors may have lived on the lost node; actor 0 did.
    assert reports[0]["actor"] == 0 and reports[0]["state"]["checkpoint"] == 2


def test_past_the_retry_bound_the_clients_fail_the_round_and_the_run_goes_on(ray_session, tmp_path):
    """Client 1 ends its actor's process on every call: after one retry, the clients of that call
    (1 and 3, on actor 1) fail the round; the other actor's clients are aggregated; the run
    neither hangs nor fails."""
    overrides = [
        "clients.num=4",
        "engine.num_actors=2",
        "rounds=1",
        "scenario.num_tasks=1",
        "model.hidden=[32]",
        "train.batch_size=16",
        "log.progress=false",
        "engine.max_retries=1",
        "client.app=tests.engine.actor_killer:exiting_app",
    ]
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fedcl.run(None, overrides, out=tmp_path / "run")
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=HANG_S)
    assert not runner.is_alive(), "the run hung"
    assert "error" not in outcome, outcome.get("error")
    (record,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    reason = "actor died: ActorDiedError: its worker process has died; retried 1 time"
    assert record["failures"] == [
        {"node": 1001, "reason": reason},
        {"node": 1003, "reason": reason},
    ]
    assert record["sampled"] == 4 and record["replies"] == 2 and "no_updates" not in record
    first, second = record["actor_replacements"]
    assert (first["actor"], first["attempt"], first["resent"]) == (1, 0, True)
    assert (second["actor"], second["attempt"], second["resent"]) == (1, 1, False)
    assert first["clients"] == [1, 3]
    assert outcome["result"].summary["status"] == "completed"


# --- where a moved client's state comes from (no Ray) -----------------------------------------
def _state(count: int, **others: Any) -> RecordDict:
    state = RecordDict({STATE_KEY: ConfigRecord({"train-count": count})})
    for name, value in others.items():
        state[name] = ConfigRecord({"value": value})
    return state


def _recovery(app: str, run_dir: Path | None, starts_after: int = 0) -> ActorRecovery:
    factory = ActorFactory({"client": {"app": app}}, (None, None, None), (4,), 2, 1)
    recovery = ActorRecovery(
        factory, NODES, max_retries=2, run_dir=run_dir, starts_after=starts_after
    )
    # 1000 trained in rounds 1 and 2; 1002 in 1, 2 and 3; 1006 only answered an evaluate message
    # in round 3; 1004 never answered anything.
    journal = recovery.journal
    journal.record(np.array([1000, 1002]), np.array([1, 1]), np.array([True, True]))
    journal.record(np.array([1000, 1002]), np.array([2, 2]), np.array([True, True]))
    journal.record(np.array([1002, 1006]), np.array([3, 3]), np.array([True, False]))
    return recovery


NODES = np.array([1000, 1002, 1004, 1006])


@pytest.fixture
def checkpointed(tmp_path) -> Path:
    """A run folder whose latest checkpoint is of round 2: nodes 1000 and 1002 have state; 1002
    also holds a key of a strategy's client half."""
    clients = {1000: _state(2), 1002: _state(2, **{"custom.fisher": 1.5})}
    snapshot = Snapshot(
        2,
        ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
        FedAvg(),
        encode_records(clients),
        {},
        {},
        "off",
    )
    write_checkpoint(tmp_path, snapshot)
    return tmp_path


def test_state_comes_from_the_checkpoint_only_where_it_is_current(checkpointed):
    plan = _recovery(DEFAULT_APP, checkpointed).plan(NODES)
    assert plan.checkpoint_round == 2
    assert plan.how == {"empty": 1, "checkpoint": 1, "rebuilt": 2, "lost": 0}
    assert plan.states[1000][STATE_KEY]["train-count"] == 2  # untouched since: as saved
    # 1002 trained after the checkpoint: its saved state, brought forward over round 3; the
    # strategy's key cannot be rebuilt, so it is dropped and reported.
    assert plan.trained == {1002: [3], 1006: []}
    assert list(plan.states[1002].keys()) == [STATE_KEY]
    assert plan.lost_keys == {"custom.fisher"}
    assert len(plan.states[1006]) == 0 and 1004 not in plan.states


def test_without_checkpoints_the_default_apps_state_is_rebuilt_from_round_one():
    plan = _recovery(DEFAULT_APP, None).plan(NODES)
    assert plan.checkpoint_round is None
    assert plan.trained == {1000: [1, 2], 1002: [1, 2, 3], 1006: []}
    assert plan.how == {"empty": 1, "checkpoint": 0, "rebuilt": 3, "lost": 0}


def test_state_that_can_be_neither_loaded_nor_rebuilt_is_reported_lost(checkpointed):
    custom = _recovery("tests.engine.faulty_app:app", checkpointed).plan(NODES)
    assert custom.how == {"empty": 1, "checkpoint": 1, "rebuilt": 0, "lost": 2}
    assert custom.lost == [1002, 1006] and not custom.trained
    # A resumed run (from round 5) whose checkpoints are gone: nothing is known of the rounds
    # before the journal.
    resumed = _recovery(DEFAULT_APP, checkpointed, starts_after=5).plan(NODES)
    assert resumed.how["lost"] == 4


def test_rebuild_gives_the_state_training_gives(ray_session):
    """`rebuild_state` over the rounds a client trained in equals the state its training left
    (train count, replay buffer and its statistics), on a real actor."""
    cfg = load_config(None, [*RUN, "clients.num=2"])
    dataset = load_dataset("digits")
    scenario = build_scenario(cfg, dataset)
    set_server_identity(run_id=11)
    container = to_container(cfg)
    trained, rebuilt = actor_factory(container, dataset, scenario, 11).start(2)
    node = node_id_of(0)
    try:
        grid = RayGrid([trained], [node], make_run(11))
        model = model_from_config(container, dataset.input_shape, dataset.num_classes)
        grid.initial = ArrayRecord(model.state_dict())
        for server_round in (1, 3, 4):  # task 0, then task 1 twice
            grid.send_and_receive(train_messages(grid, [node], server_round))
        expected = ray.get(trained.export_states.remote())[node]
        ray.get(rebuilt.restore_states.remote({}, {node: [1, 3, 4]}))
        state = ray.get(rebuilt.export_states.remote())[node]
    finally:
        kill_actors([trained, rebuilt])
    assert expected[STATE_KEY]["train-count"] == 3
    assert len(expected[replay.BUFFER_KEY]["ids"].numpy()) == 20
    assert list(expected[replay.STATS_KEY]["offered"]) == [0, 1]
    columns, wanted = encode_records({0: state}), encode_records({0: expected})
    assert columns.keys() == wanted.keys()
    for name, column in columns.items():
        np.testing.assert_array_equal(column, wanted[name])
