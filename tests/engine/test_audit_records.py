"""The deletion audit without Ray: the trained ids taken out of the replies, the violations counted
per round and client, the records it writes, its checkpoint state, and the same audit recomputed
from a run folder built by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedcl.engine.audit import MAX_VIOLATIONS, DeletionAudit, pop_trained_ids, recompute_audit
from fedcl.engine.flower_compat import (
    assign_message_id,
    error_reply,
    node_id_of,
    set_server_identity,
)
from fedcl.errors import FedclError
from fedcl.protocol import AUDIT_KEY, AUDIT_SAMPLE_IDS
from fedcl.scenario.deletion import deletion_arrays, deletion_file
from fedcl.scenario.scenario import NEVER


class Deletions:
    """The part of a Scenario the audit reads: the round each training sample is deleted in."""

    def __init__(self, deletion_round: list[int]) -> None:
        self.deletion_round = np.asarray(deletion_round, dtype=np.int64)

    def deleted(self, ids: np.ndarray, server_round: int) -> np.ndarray:
        return self.deletion_round[ids] <= server_round


# Samples 0-9; 2 and 3 deleted in round 2, 7 in round 4, the others never.
ROUNDS = [NEVER, NEVER, 2, 2, NEVER, NEVER, NEVER, 4, NEVER, NEVER]


def request(client: int) -> Message:
    set_server_identity(run_id=5)
    message = Message(
        RecordDict(), dst_node_id=node_id_of(client), message_type=MessageType.TRAIN, group_id="1"
    )
    assign_message_id(message)
    return message


def reply(client: int, content: RecordDict) -> Message:
    return Message(content, reply_to=request(client))


def audited(client: int, ids: list[int]) -> Message:
    """A train reply of `client` that names the samples it trained on, as fedcl's ClientApp."""
    sample_ids = np.asarray(ids, dtype="<i8").tobytes()
    return reply(
        client,
        RecordDict(
            {
                "metrics": MetricRecord({"num-examples": len(ids)}),
                AUDIT_KEY: ConfigRecord({AUDIT_SAMPLE_IDS: sample_ids}),
            }
        ),
    )


def test_the_trained_ids_are_taken_out_of_the_replies_per_client() -> None:
    replies = [
        reply(1, RecordDict({"metrics": MetricRecord({"num-examples": 3})})),  # no audit record
        reply(2, RecordDict({AUDIT_KEY: MetricRecord({"x": 1})})),  # not a ConfigRecord
        error_reply(request(3), "broken"),
        audited(4, [9, 2, 2, 5]),
        audited(0, []),
    ]
    trained = pop_trained_ids(replies)
    assert sorted(trained) == [0, 4]
    assert trained[4].dtype == np.int64 and trained[4].tolist() == [9, 2, 2, 5]
    assert trained[0].dtype == np.int64 and trained[0].tolist() == []
    trained[4][0] = 1  # an array of its own, not a read-only view of the message's bytes
    # Strategies never see the audit record; the rest of the reply stays.
    assert AUDIT_KEY not in replies[3].content and AUDIT_KEY not in replies[4].content
    assert "metrics" in replies[3].content
    assert AUDIT_KEY in replies[1].content


def test_violations_are_counted_per_round_and_client_from_the_deletion_round_on() -> None:
    audit = DeletionAudit(Deletions(ROUNDS), None)
    assert audit.deleted == 3
    audit.record(1, {0: np.array([2, 3, 7]), 1: np.array([0, 1])})  # before any deletion
    audit.record(2, {5: np.array([7, 2, 0]), 1: np.array([3, 2, 4]), 0: np.array([1])})
    audit.record(4, {3: np.array([7, 8, 7])})
    assert audit.summary() == {
        "deleted": 3,
        "used_after_delete": 5,
        "violations": [  # in client order within a round
            {"round": 2, "client": 1, "samples": 2},
            {"round": 2, "client": 5, "samples": 1},
            {"round": 4, "client": 3, "samples": 2},
        ],
    }
    assert audit.last_trained[0] == 4
    assert audit.last_trained[1].keys() == {3}


def test_the_summary_lists_the_first_violations_only_and_counts_them_all() -> None:
    audit = DeletionAudit(Deletions(ROUNDS), None)
    for server_round in range(2, 2 + MAX_VIOLATIONS + 5):
        audit.record(server_round, {7: np.array([2])})
    summary = audit.summary()
    assert summary["used_after_delete"] == MAX_VIOLATIONS + 5
    assert summary["violations"] == [
        {"round": r, "client": 7, "samples": 1} for r in range(2, 2 + MAX_VIOLATIONS)
    ]
    state = audit.state_dict()
    assert state == {"used_after_delete": MAX_VIOLATIONS + 5, "violations": summary["violations"]}


def test_a_checkpointed_audit_continues_where_it_stopped() -> None:
    audit = DeletionAudit(Deletions(ROUNDS), None)
    audit.record(2, {1: np.array([2, 3])})
    state = json.loads(json.dumps(audit.state_dict()))
    resumed = DeletionAudit(Deletions(ROUNDS), None)
    resumed.load_state_dict(state)
    state["violations"][0]["samples"] = 99  # the loaded state is a copy
    for each in (audit, resumed):
        each.record(4, {0: np.array([7])})
    assert resumed.summary() == audit.summary()
    assert resumed.summary()["used_after_delete"] == 3


def write_events(folder: Path, deletions: dict[int, tuple[int, dict[int, list[int]]]]) -> None:
    """events.jsonl and deletions/ by hand: {timeline index: (round, {client: ids})}, with an
    event of another kind in between."""
    lines = [json.dumps({"round": 1, "kind": "task", "task": 0})]
    for index, (server_round, per_client) in deletions.items():
        arrays = deletion_arrays({c: np.asarray(i, dtype=np.int64) for c, i in per_client.items()})
        (folder / "deletions").mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / deletion_file(index), **arrays)
        count = len(np.unique(arrays["ids"]))
        entry = {"round": server_round, "kind": "delete", "ids_file": deletion_file(index)}
        lines.append(json.dumps({**entry, "deleted_samples": count}))
    (folder / "events.jsonl").write_text("".join(line + "\n" for line in lines))


def test_the_recorded_folder_recomputes_to_the_same_audit(tmp_path: Path) -> None:
    audit = DeletionAudit(Deletions(ROUNDS), tmp_path)
    audit.record(1, {0: np.array([2, 3, 7])})
    audit.record(2, {12: np.array([7, 2, 9]), 3: np.array([3, 2, 4])})
    audit.record(3, {})  # nothing trained: no file
    audit.record(4, {0: np.array([9, 7])})
    files = sorted(p.name for p in (tmp_path / "trained_samples").iterdir())
    assert files == ["round_00001.npz", "round_00002.npz", "round_00004.npz"]
    with np.load(tmp_path / "trained_samples" / "round_00002.npz") as data:
        assert data.files == ["client_3", "client_12"]
        assert data["client_12"].dtype == np.int32 and data["client_12"].tolist() == [7, 2, 9]
    write_events(tmp_path, {0: (2, {0: [2], 1: [3, 2]}), 4: (4, {5: [7]})})
    assert recompute_audit(tmp_path) == audit.summary()
    assert audit.summary()["used_after_delete"] == 4


def test_the_records_folder_is_created_or_reused(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "one"  # neither exists yet
    audit = DeletionAudit(Deletions(ROUNDS), out)
    assert audit.last_trained == (0, {})  # nothing trained yet
    assert (out / "trained_samples").is_dir()
    audit.record(1, {0: np.array([1])})
    DeletionAudit(Deletions(ROUNDS), out)  # a resumed run finds the folder in place
    assert (out / "trained_samples" / "round_00001.npz").is_file()


def test_no_folder_records_nothing(tmp_path: Path) -> None:
    audit = DeletionAudit(Deletions(ROUNDS), None)
    audit.record(2, {0: np.array([2])})
    assert audit.folder is None and not list(tmp_path.iterdir())


def test_an_id_deleted_twice_counts_once_from_its_first_round(tmp_path: Path) -> None:
    (tmp_path / "trained_samples").mkdir()
    trained = {2: {"client_0": [5, 30]}, 3: {"client_0": [5, 6, 40]}, 5: {"client_1": [6, 50]}}
    for server_round, arrays in trained.items():
        path = tmp_path / "trained_samples" / f"round_{server_round:05d}.npz"
        np.savez_compressed(path, **{k: np.asarray(v, dtype=np.int32) for k, v in arrays.items()})
    # 6 is deleted in round 5 and again (by a later event in the timeline) from round 3.
    write_events(tmp_path, {1: (5, {1: [6, 20]}), 2: (3, {0: [5, 6]})})
    assert recompute_audit(tmp_path) == {
        "deleted": 3,
        "used_after_delete": 3,
        "violations": [
            {"round": 3, "client": 0, "samples": 2},
            {"round": 5, "client": 1, "samples": 1},
        ],
    }


def test_ids_beyond_every_deleted_id_are_not_deleted(tmp_path: Path) -> None:
    (tmp_path / "trained_samples").mkdir()
    np.savez_compressed(
        tmp_path / "trained_samples" / "round_00009.npz",
        client_2=np.array([0, 1, 4, 1000], dtype=np.int32),
    )
    write_events(tmp_path, {0: (1, {0: [1, 3]})})
    assert recompute_audit(tmp_path) == {
        "deleted": 2,
        "used_after_delete": 1,
        "violations": [{"round": 9, "client": 2, "samples": 1}],
    }


def test_a_run_without_deletions_audits_clean(tmp_path: Path) -> None:
    (tmp_path / "trained_samples").mkdir()
    np.savez_compressed(tmp_path / "trained_samples" / "round_00001.npz", client_0=np.arange(5))
    expected = {"deleted": 0, "used_after_delete": 0, "violations": []}
    assert recompute_audit(tmp_path) == expected  # no events.jsonl
    write_events(tmp_path, {})
    assert recompute_audit(tmp_path) == expected


def test_an_ids_file_that_disagrees_with_its_event_is_refused(tmp_path: Path) -> None:
    (tmp_path / "trained_samples").mkdir()
    write_events(tmp_path, {3: (2, {0: [1, 2, 2]})})
    path = tmp_path / "events.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    entries[1]["deleted_samples"] = 3
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(FedclError, match=r"event_00003\.npz holds 2 distinct ids, .* says 3"):
        recompute_audit(tmp_path)
    (tmp_path / deletion_file(3)).unlink()
    with pytest.raises(FedclError, match=r"event_00003\.npz is missing .*round 2\)"):
        recompute_audit(tmp_path)
