"""`stream_summary` (asynchronous and recurring streams) against values computed by hand, on
records written here and on a recurring run's own metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedcl
from fedcl.metrics.continual import stream_summary
from tests.engine.runs import read_jsonl

# A recurring stream: task 0, then 1, then 0 again (tasks go back: no task-end matrix). Round 3
# has no evaluation; round 2 did not evaluate task 1 (None).
RECORDS = [
    {"round": 1, "task": 0, "acc": {"0": 0.5}},
    {"round": 2, "task": 1, "acc": {"0": 0.9, "1": None}},
    {"round": 3, "task": 1, "replies": 0},
    {"round": 4, "task": 1, "acc": {"0": 0.7, "1": 0.8}},
    {"round": 5, "task": 0, "acc": {"0": 0.6, "1": 0.3}},
    {"round": 6, "task": 0, "acc": {"0": 0.65, "1": 0.4}},
]


def forgetting(summary: dict) -> float:
    """The max-based forgetting (named ``forgetting_max`` since `fgt` = -BWT was added)."""
    return summary["forgetting_max"] if "forgetting_max" in summary else summary["forgetting"]


def test_stream_summary_equals_the_hand_computed_values() -> None:
    summary = stream_summary(RECORDS)
    # final accuracies 0.65 and 0.4; best earlier 0.9 and 0.8: forgetting is best minus final
    assert summary["acc"] == pytest.approx((0.65 + 0.4) / 2)
    assert forgetting(summary) == pytest.approx(((0.9 - 0.65) + (0.8 - 0.4)) / 2)
    # the largest drop within 10 evaluations: task 0 0.9 -> 0.6, task 1 0.8 -> 0.3
    assert summary["windowed_forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.3)) / 2)
    assert summary["tasks_seen"] == 2
    assert summary["final_round"] == 6
    for undefined in ("bwt", "fwt", "min_acc", "wc_acc"):
        assert summary[undefined] is None
    assert summary.get("fgt") is None


def test_the_window_limits_which_drops_count() -> None:
    # window 2: only drops between consecutive evaluations of a task
    summary = stream_summary(RECORDS, window=2)
    # task 0: 0.5 0.9 0.7 0.6 0.65 -> 0.2; task 1: 0.8 0.3 0.4 -> 0.5
    assert summary["windowed_forgetting"] == pytest.approx((0.2 + 0.5) / 2)
    assert forgetting(summary) == pytest.approx(forgetting(stream_summary(RECORDS)))


def test_a_task_at_its_best_at_the_end_has_forgotten_nothing() -> None:
    records = [
        {"round": 1, "task": 0, "acc": {"0": 0.2}},
        {"round": 2, "task": 1, "acc": {"0": 0.4, "1": 0.1}},
        {"round": 3, "task": 1, "acc": {"0": 0.3, "1": 0.9}},
    ]
    summary = stream_summary(records)
    assert summary["acc"] == pytest.approx(0.6)
    assert forgetting(summary) == pytest.approx((0.1 + 0.0) / 2)  # task 1 ends at its best
    assert summary["windowed_forgetting"] == pytest.approx((0.1 + 0.0) / 2)


def test_no_evaluation_is_an_error() -> None:
    with pytest.raises(ValueError, match="no evaluation records"):
        stream_summary([{"round": 1, "task": 0}])


@pytest.mark.usefixtures("ray_session")
def test_a_recurring_run_summarises_its_own_records(tmp_path: Path) -> None:
    # task 0, then 1 (task 0 is forgotten), then 0 again (task 1 is): no task-end matrix
    result = fedcl.run(
        None,
        "clients.num=3",
        "rounds=3",
        "scenario.num_tasks=2",
        "scenario.stream=[0, 1, 0]",
        "model.hidden=[16]",
        "train.epochs=2",
        "train.lr=0.2",
        "engine.num_actors=1",
        "log.progress=false",
        out=tmp_path / "run",
    )
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bwt"] is None  # the stream summary, not the task-end one
    final = records[-1]["acc"]
    best = {t: max(r["acc"][t] for r in records if t in r["acc"]) for t in final}
    drops = [best[t] - final[t] for t in final]
    assert forgetting(summary) == pytest.approx(sum(drops) / len(drops))
    assert forgetting(summary) > 0.1  # not vacuous: the recurring stream forgets
    assert summary["acc"] == pytest.approx(sum(final.values()) / len(final))
    assert result.summary["acc"] == summary["acc"]


def test_the_keys_and_messages_of_a_stream_summary() -> None:
    summary = stream_summary(RECORDS)
    assert set(summary) == {
        "acc",
        "bwt",
        "fgt",
        "forgetting_max",
        "fwt",
        "min_acc",
        "wc_acc",
        "windowed_forgetting",
        "tasks_seen",
        "final_round",
    }
    with pytest.raises(
        ValueError, match=r"^no evaluation records \(records with an 'acc' key\) to summarise$"
    ):
        stream_summary([{"round": 1, "task": 0}])


def test_a_task_not_evaluated_in_the_final_record_is_left_out() -> None:
    records = [*RECORDS, {"round": 7, "task": 0, "acc": {"0": 0.8, "1": None}}]
    summary = stream_summary(records)
    assert summary["acc"] == pytest.approx(0.8)
    assert forgetting(summary) == pytest.approx(0.9 - 0.8)
    assert summary["tasks_seen"] == 2


def test_the_default_window_is_ten_evaluations() -> None:
    accs = [1.0] + [0.6] * 9 + [0.0]
    records = [{"round": r, "task": 0, "acc": {"0": a}} for r, a in enumerate(accs, start=1)]
    assert stream_summary(records)["windowed_forgetting"] == pytest.approx(0.6)
    assert stream_summary(records, window=11)["windowed_forgetting"] == pytest.approx(1.0)
