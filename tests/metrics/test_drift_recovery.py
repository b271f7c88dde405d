"""Drift recovery on hand-made accuracy series with known answers."""

from __future__ import annotations

import pytest

from fedcl.metrics.drift import DriftPoint, drift_recovery, recovery_summary


def _records(series: dict[int, float | None], task_of=lambda r: 0) -> list[dict]:
    """One record per round; None: a round not evaluated (no `acc`)."""
    out = []
    for r, value in series.items():
        record = {"round": r, "task": task_of(r)}
        if value is not None:
            record["acc"] = {"0": value}
        out.append(record)
    return out


def test_drop_and_rounds_to_recover_on_a_hand_made_series():
    records = _records({1: 0.5, 2: 0.7, 3: 0.8, 4: 0.4, 5: 0.6, 6: 0.75, 7: 0.79, 8: 0.8})
    [event] = drift_recovery(records, [DriftPoint(event=3, round=4, type="noise", clients=2)])
    assert event["pre_acc"] == pytest.approx(0.8)
    assert event["acc_at_drift"] == pytest.approx(0.4)
    assert event["drop"] == pytest.approx(0.4)
    assert event["max_drop"] == pytest.approx(0.4)
    # 0.79 >= 0.8 - 0.02 at round 7: three rounds after the event at round 4.
    assert event["recovered"] is True
    assert event["recovered_round"] == 7
    assert event["rounds_to_recover"] == 3
    assert (event["event"], event["type"], event["clients"]) == (3, "noise", 2)


def test_a_larger_tolerance_recovers_sooner():
    records = _records({1: 0.8, 2: 0.4, 3: 0.65, 4: 0.75, 5: 0.8})
    [loose] = drift_recovery(records, [DriftPoint(0, 2)], tolerance=0.2)
    [strict] = drift_recovery(records, [DriftPoint(0, 2)], tolerance=0.0)
    assert (loose["recovered_round"], loose["rounds_to_recover"]) == (3, 1)
    assert (strict["recovered_round"], strict["rounds_to_recover"]) == (5, 3)


def test_drift_that_never_recovers():
    records = _records({1: 0.9, 2: 0.9, 3: 0.5, 4: 0.6, 5: 0.3})
    [event] = drift_recovery(records, [DriftPoint(0, 3)])
    assert event["recovered"] is False
    assert event["recovered_round"] is None and event["rounds_to_recover"] is None
    assert event["drop"] == pytest.approx(0.4)
    assert event["max_drop"] == pytest.approx(0.6)  # the lowest point, round 5
    summary = recovery_summary([event], 0.02)
    assert summary["drift_not_recovered"] == 1
    assert summary["drift_rounds_to_recover"] is None
    assert summary["drift_drop"] == pytest.approx(0.4)


def test_no_drop_beyond_tolerance_recovers_at_once():
    records = _records({1: 0.8, 2: 0.79, 3: 0.81})
    [event] = drift_recovery(records, [DriftPoint(0, 2)])
    assert event["recovered"] is True and event["rounds_to_recover"] == 0
    assert event["drop"] == pytest.approx(0.01)


def test_all_equal_accuracies():
    records = _records({1: 0.5, 2: 0.5, 3: 0.5})
    [event] = drift_recovery(records, [DriftPoint(0, 2)])
    assert event["drop"] == 0.0 and event["max_drop"] == 0.0
    assert event["rounds_to_recover"] == 0


def test_rounds_not_evaluated_are_skipped_and_recovery_seen_at_the_next_evaluation():
    # eval.every = 2: rounds 5 and 7 carry no accuracy.
    records = _records({2: 0.8, 3: None, 4: 0.3, 5: None, 6: 0.5, 7: None, 8: 0.8})
    [event] = drift_recovery(records, [DriftPoint(0, 3)])
    assert event["pre_acc"] == pytest.approx(0.8)
    assert event["acc_at_drift"] == pytest.approx(0.3)  # the first evaluation from round 3 on
    assert event["recovered_round"] == 8 and event["rounds_to_recover"] == 5


def test_only_the_tasks_seen_before_the_drift_are_followed():
    # Task 1 starts with the drift at round 3 at accuracy 0.0: it is not a drop of the drift.
    records = [
        {"round": 1, "task": 0, "acc": {"0": 0.6}},
        {"round": 2, "task": 0, "acc": {"0": 0.9}},
        {"round": 3, "task": 1, "acc": {"0": 0.85, "1": 0.0}},
        {"round": 4, "task": 1, "acc": {"0": 0.89, "1": 0.5}},
    ]
    [event] = drift_recovery(records, [DriftPoint(0, 3)], tolerance=0.02)
    assert event["pre_acc"] == pytest.approx(0.9)
    assert event["drop"] == pytest.approx(0.05)
    assert event["recovered_round"] == 4


def test_a_drift_before_any_evaluation_cannot_be_measured():
    records = _records({1: 0.5, 2: 0.6})
    [event] = drift_recovery(records, [DriftPoint(0, 1)])
    assert event["pre_acc"] is None and event["drop"] is None and event["recovered"] is None
    assert recovery_summary([event], 0.02)["drift_drop"] is None


def test_several_events_are_each_measured_and_averaged():
    records = _records({1: 0.8, 2: 0.6, 3: 0.8, 4: 0.8, 5: 0.5, 6: 0.7, 7: 0.8})
    events = drift_recovery(records, [DriftPoint(0, 2), DriftPoint(1, 5)])
    assert [e["rounds_to_recover"] for e in events] == [1, 2]
    summary = recovery_summary(events, 0.02)
    assert summary["drift_drop"] == pytest.approx((0.2 + 0.3) / 2)
    assert summary["drift_rounds_to_recover"] == pytest.approx(1.5)
    assert summary["drift_not_recovered"] == 0


def test_negative_tolerance_is_refused():
    with pytest.raises(ValueError, match="tolerance"):
        drift_recovery([], [], tolerance=-0.1)


def test_drift_events_of_a_scenario_timeline_feed_the_summary():
    from fedcl.config import load_config
    from fedcl.metrics.run_metrics import run_summary
    from fedcl.scenario.builder import build_scenario
    from fedcl.scenario.datasets import load_dataset

    events = (
        "events=[{round: 3, kind: drift, clients: [0, 1], type: label_swap, pairs: [[0, 1]]},"
        " {round: 5, kind: join, clients: [2]}]"
    )
    cfg = load_config(None, ["rounds=6", "scenario.num_tasks=1", "clients.num=3", events])
    scenario = build_scenario(cfg, load_dataset("digits", seed=0))
    records = _records({1: 0.6, 2: 0.9, 3: 0.5, 4: 0.7, 5: 0.89, 6: 0.9})
    summary = run_summary(
        records, num_tasks=1, sequential=True, timeline=scenario.timeline, every=1, tolerance=0.02
    )
    [event] = summary["drift_recovery"]["events"]  # the join is not a drift
    assert (event["round"], event["type"], event["clients"]) == (3, "label_swap", 2)
    assert event["drop"] == pytest.approx(0.4) and event["rounds_to_recover"] == 2
    assert summary["drift_recovery"]["tolerance"] == 0.02
    assert summary["eval_every"] == 1
