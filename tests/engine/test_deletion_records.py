"""Deletion records: each delete event's ids in the run folder, counted once, and the deletion
audit recomputed from the folder alone."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import fedcl
from fedcl.config import load_config
from fedcl.engine.audit import recompute_audit
from fedcl.engine.events import DELETED_IDS_KEY, MAX_LISTED_CLIENTS, event_log_entry
from fedcl.errors import FedclError
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.deletion import Deletions, deletion_arrays, deletion_file
from fedcl.scenario.events import Event
from fedcl.scenario.scenario import NEVER, build_scenario
from tests.engine.runs import read_jsonl

# Class 1 (task 0, rounds 1-2) is deleted at round 4, after it was learned; client 0 then deletes
# half its samples (some of class 1 already), then leaves with all of them: the later events ask
# again for ids an earlier one deleted.
OVERRIDES = [
    "clients.num=4",
    "rounds=8",
    "scenario.num_tasks=4",
    "train.replay_size=20",
    "engine.num_actors=2",
    "log.progress=false",
    "events=[{round: 4, kind: delete, what: class, class: 1},"
    " {round: 6, kind: delete, clients: [0], what: samples, fraction: 0.5},"
    " {round: 7, kind: delete, clients: [0], what: client}]",
]


def delete_entries(scenario) -> list[dict]:
    return [event_log_entry(e, scenario) for e in scenario.timeline if e.kind == "delete"]


def test_a_delete_event_counts_only_ids_no_earlier_event_deleted():
    digits = load_dataset("digits")
    scenario = build_scenario(load_config(None, OVERRIDES), digits)
    by_class, by_fraction, by_client = delete_entries(scenario)
    held = np.concatenate([scenario.train_indices(0, t) for t in range(scenario.num_tasks)])
    of_class_1 = int((digits.y_train[held] == 1).sum())
    asked = round(0.5 * len(held))
    assert by_class["deleted"]["0"] == of_class_1 > 0
    # The fraction draws over all of client 0's samples; those of class 1 are gone already.
    assert 0 < by_fraction["deleted_samples"] < asked
    assert by_client["deleted_samples"] == len(held) - of_class_1 - by_fraction["deleted_samples"]
    files = [e[DELETED_IDS_KEY]["ids"] for e in (by_class, by_fraction, by_client)]
    every = np.concatenate(files)
    assert len(np.unique(every)) == len(every)  # no id is in two events' records
    assert np.array_equal(np.sort(every), np.flatnonzero(scenario.deletion_round != NEVER))
    assert sum(e["deleted_samples"] for e in (by_class, by_fraction, by_client)) == len(every)


def test_a_sample_two_clients_held_counts_once_and_stays_with_both():
    deletions = Deletions.none(8)
    ids = {0: np.array([1, 2]), 1: np.array([2, 3])}  # sample 2 is in both clients' tasks
    deletions.record(Event(3, "delete", (0, 1), {"what": "client"}, index=0), ids)
    deletions.record(Event(5, "delete", (0,), {"what": "client"}, index=1), {0: np.array([1, 4])})
    assert {c: v.tolist() for c, v in deletions.by_event[0].items()} == {0: [1, 2], 1: [2, 3]}
    assert {c: v.tolist() for c, v in deletions.by_event[1].items()} == {0: [4]}
    assert deletions.rounds.tolist() == [NEVER, 3, 3, 3, 5, NEVER, NEVER, NEVER]
    arrays = deletion_arrays(deletions.by_event[0])
    assert arrays["ids"].tolist() == [1, 2, 2, 3] and arrays["clients"].tolist() == [0, 0, 1, 1]
    scenario = SimpleNamespace(deleted_by_event=deletions.by_event)
    entry = event_log_entry(Event(3, "delete", (0, 1), {"what": "client"}, index=0), scenario)
    assert entry["deleted_samples"] == 3 and entry["deleted"] == {"0": 2, "1": 2}


@pytest.mark.usefixtures("ray_session")
def test_the_audit_recomputed_from_the_run_folder_equals_the_summary(tmp_path):
    out = tmp_path / "run"
    result = fedcl.run(None, *OVERRIDES, out=out)
    audit = result.summary["deletion_audit"]
    assert recompute_audit(out) == audit
    logged = [e for e in read_jsonl(out / "events.jsonl") if e["kind"] == "delete"]
    assert [e["round"] for e in logged] == [4, 6, 7]
    assert sum(e["deleted_samples"] for e in logged) == audit["deleted"] > 0
    deleted_round = {}
    for entry in logged:
        assert DELETED_IDS_KEY not in entry
        with np.load(out / entry["ids_file"]) as data:
            ids, clients = data["ids"], data["clients"]
        assert ids.dtype == clients.dtype == np.int64 and (np.diff(ids) >= 0).all()
        assert {str(c): int((clients == c).sum()) for c in np.unique(clients)} == entry["deleted"]
        deleted_round.update(dict.fromkeys(ids.tolist(), entry["round"]))
    # Not vacuous: deleted samples were trained on (fresh or replayed) before their round.
    trained_before = 0
    for path in (out / "trained_samples").glob("round_*.npz"):
        server_round = int(path.stem.split("_")[1])
        with np.load(path) as data:
            for name in data.files:
                rounds = [deleted_round.get(i) for i in data[name].tolist()]
                trained_before += sum(r is not None and server_round < r for r in rounds)
    assert trained_before > 0


def write_run(folder: Path, deletions: dict[int, tuple[int, dict[int, list[int]]]], trained):
    """A run folder by hand: delete events {timeline index: (round, {client: ids})} and
    trained_samples {round: {client: ids}}."""
    (folder / "trained_samples").mkdir(parents=True)
    lines = []
    for index, (server_round, per_client) in deletions.items():
        arrays = deletion_arrays({c: np.asarray(i, dtype=np.int64) for c, i in per_client.items()})
        (folder / "deletions").mkdir(exist_ok=True)
        np.savez_compressed(folder / deletion_file(index), **arrays)
        entry = {"round": server_round, "kind": "delete", "ids_file": deletion_file(index)}
        lines.append(json.dumps({**entry, "deleted_samples": len(np.unique(arrays["ids"]))}))
    (folder / "events.jsonl").write_text("".join(line + "\n" for line in lines))
    for server_round, per_client in trained.items():
        arrays = {f"client_{c}": np.asarray(i, dtype=np.int32) for c, i in per_client.items()}
        np.savez_compressed(folder / "trained_samples" / f"round_{server_round:05d}.npz", **arrays)


def test_recompute_audit_counts_deleted_samples_trained_on_from_their_round(tmp_path):
    write_run(
        tmp_path,
        {2: (3, {0: [5, 7], 1: [20]}), 5: (4, {1: [21, 22]})},
        {
            2: {0: [5, 7, 8], 1: [20, 21]},  # before any deletion: fine
            3: {0: [5, 8], 1: [21, 22]},  # 5 is gone from round 3; 21, 22 only from round 4
            4: {1: [20, 21, 23], 10: [7]},
        },
    )
    assert recompute_audit(tmp_path) == {
        "deleted": 5,
        "used_after_delete": 4,
        "violations": [
            {"round": 3, "client": 0, "samples": 1},
            {"round": 4, "client": 1, "samples": 2},
            {"round": 4, "client": 10, "samples": 1},
        ],
    }


def test_recompute_audit_refuses_a_folder_it_cannot_check(tmp_path):
    write_run(tmp_path, {0: (2, {0: [1, 2]})}, {})
    (tmp_path / deletion_file(0)).unlink()
    with pytest.raises(FedclError, match="is missing"):
        recompute_audit(tmp_path)
    other = tmp_path / "other"
    write_run(other, {}, {})
    (other / "trained_samples").rmdir()
    with pytest.raises(FedclError, match="log.trained_samples=true"):
        recompute_audit(other)


def test_an_event_on_many_clients_is_logged_summarised():
    clients = 4 * MAX_LISTED_CLIENTS
    deleted = {c: np.array([c, c + 1], dtype=np.int64) for c in range(0, clients, 2)}
    event = Event(5, "delete", range(clients), {"what": "class", "class": 3}, index=9)
    entry = event_log_entry(event, SimpleNamespace(deleted_by_event={9: deleted}))
    ids = entry.pop(DELETED_IDS_KEY)
    assert entry == {
        "round": 5,
        "kind": "delete",
        "clients": "all",
        "what": "class",
        "class": 3,
        "deleted_samples": clients,
        "deleted_clients": clients // 2,
        "ids_file": "deletions/event_00009.npz",
    }
    assert np.array_equal(ids["ids"], np.arange(clients))
    assert np.array_equal(ids["clients"], np.repeat(np.arange(0, clients, 2), 2))
    task = Event(1, "task", range(clients), {"task": 0}, index=0)
    assert event_log_entry(task, None) == {"round": 1, "kind": "task", "clients": "all", "task": 0}
    few = Event(5, "delete", (1, 2), {"what": "client"}, index=9)
    small = event_log_entry(few, SimpleNamespace(deleted_by_event={9: {2: np.array([4])}}))
    assert small["clients"] == [1, 2] and small["deleted"] == {"2": 1}
