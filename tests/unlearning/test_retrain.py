"""`retrain` is exact: rollback and replay give the oracle's model bit for bit, after several
deletions, with no deleted sample trained on in any replayed round."""

from __future__ import annotations

import json

import pytest

import fedcl
from fedcl.unlearning import table
from tests.unlearning.runs import BASE, EVENTS, read_jsonl


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, ray_session):
    out = tmp_path_factory.mktemp("retrain") / "run"
    fedcl.run(None, [*BASE, EVENTS, "unlearning.method=retrain", "unlearning.oracle=true"], out=out)
    return out


def test_retrain_equals_the_oracle_bitwise_at_every_deletion_and_at_the_end(retrained):
    records = read_jsonl(retrained / "unlearning.jsonl")
    assert [r["round"] for r in records] == [4, 5]
    for record in records:
        # float64 L2 of float32 differences: 0.0 only when every parameter is the same bits
        assert record["l2_to_oracle"] == 0.0
        assert record["unlearned"] == record["oracle"]
    # Both deletions' data were trained in round 1: each rollback goes back to round 0 and
    # replays, the second over the first's replayed history.
    assert [r["cost"]["rolled_back_to"] for r in records] == [0, 0]
    assert [r["cost"]["rounds"] for r in records] == [3, 4]
    final = json.loads((retrained / "summary.json").read_text())["unlearning"]["final"]
    assert final["l2_to_oracle"] == 0.0


def test_exact_unlearning_of_a_class_matches_the_oracle_and_keeps_retained_accuracy(retrained):
    by_class = read_jsonl(retrained / "unlearning.jsonl")[0]
    assert by_class["forget_samples"] > 0
    assert by_class["gap"]["forget_acc"] == 0.0
    assert by_class["gap"]["retain_acc"] == 0.0
    assert by_class["unlearned"]["retain_acc"] >= by_class["before"]["retain_acc"] - 0.1
    # The oracle never saw class 1: its losses there look like unseen test data's.
    assert abs(by_class["oracle"]["mia_auc"] - 0.5) < 0.15


def test_no_deleted_sample_is_used_in_any_round_replayed_or_not(retrained):
    summary = json.loads((retrained / "summary.json").read_text())
    assert summary["deletion_audit"]["used_after_delete"] == 0
    assert summary["deletion_audit"]["deleted"] > 0


def test_rollback_states_are_pruned_once_every_deletion_is_handled(retrained):
    summary = json.loads((retrained / "summary.json").read_text())["unlearning"]
    assert 0 < summary["rollback_states"]["written"] <= 6 + 5  # the run's rounds plus replays
    assert not list((retrained / "unlearning" / "rollback" / "checkpoints").glob("round_*"))


def test_the_methods_table_reads_the_run(retrained, capsys):
    assert table.main([str(retrained)]) == 0
    header, rule, line = capsys.readouterr().out.splitlines()
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    first = read_jsonl(retrained / "unlearning.jsonl")[0]
    assert cells[0] == "retrain"
    mine, oracle = first["unlearned"]["forget_acc"], first["oracle"]["forget_acc"]
    assert cells[1] == f"{mine:.3f} ({oracle:.3f})"
    assert cells[5] == "0"  # L2 to the oracle
    assert table.main([str(retrained.parent)]) == 2  # not a run folder: one line, exit 2
    assert "not a finished run" in capsys.readouterr().err
