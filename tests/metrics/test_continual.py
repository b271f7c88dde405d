"""Continual metrics on hand-built runs whose answers are worked out in the comments."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedcl.metrics.continual import accuracy_matrix, continual_summary, read_metrics


def rec(round_: int, task: int, acc: dict[int, float], nxt: dict[int, float] | None = None):
    record = {"round": round_, "task": task, "acc": {str(k): v for k, v in acc.items()}}
    if nxt is not None:
        record["acc_next"] = {str(k): v for k, v in nxt.items()}
    return record


# 3 tasks x 2 rounds. Task-end rows (rounds 2, 4, 6):
#   R = [[0.80, 0.20,  nan],
#        [0.85, 0.90, 0.30],
#        [0.50, 0.80, 0.90]]
THREE_TASKS = [
    rec(1, 0, {0: 0.5}, {1: 0.1}),
    rec(2, 0, {0: 0.8}, {1: 0.2}),
    rec(3, 1, {0: 0.4, 1: 0.6}, {2: 0.15}),
    rec(4, 1, {0: 0.85, 1: 0.9}, {2: 0.3}),
    rec(5, 2, {0: 0.3, 1: 0.7, 2: 0.5}),
    rec(6, 2, {0: 0.5, 1: 0.8, 2: 0.9}),
]
INIT = {"0": 0.1, "1": 0.1, "2": 0.1}


def test_accuracy_matrix_takes_the_last_round_of_each_task():
    r = accuracy_matrix(THREE_TASKS, 3)
    expected = np.array([[0.8, 0.2, np.nan], [0.85, 0.9, 0.3], [0.5, 0.8, 0.9]])
    np.testing.assert_array_equal(np.isnan(r), np.isnan(expected))
    np.testing.assert_allclose(r[~np.isnan(r)], expected[~np.isnan(expected)])


def test_summary_matches_hand_computed_values():
    s = continual_summary(THREE_TASKS, 3, init_acc=INIT)
    approx = pytest.approx
    assert s["acc"] == approx((0.5 + 0.8 + 0.9) / 3)
    # Lopez-Paz BWT divides by T-1: ((0.5-0.8) + (0.8-0.9)) / 2.
    assert s["bwt"] == approx(-0.2)
    assert s["fgt"] == approx(0.2)  # FOT's FGT = -BWT
    # Chaudhry: task 0 peaked at 0.85 after task 1, not at its own end (0.8).
    assert s["forgetting_max"] == approx(((0.85 - 0.5) + (0.9 - 0.8)) / 2)
    assert s["fwt"] == approx(((0.2 - 0.1) + (0.3 - 0.1)) / 2)
    # Minimum after each task ended: task 0 over rounds 3-6 -> 0.3, task 1 over rounds 5-6 -> 0.7.
    assert s["min_acc"] == approx(0.5)
    assert s["wc_acc"] == approx(0.9 / 3 + (2 / 3) * 0.5)
    # Largest drop in any window of 10: task 0 0.85->0.3, task 1 0.9->0.7, task 2 none.
    assert s["windowed_forgetting"] == approx((0.55 + 0.2 + 0.0) / 3)
    assert s["accuracy_matrix"] == [[0.8, 0.2, None], [0.85, 0.9, 0.3], [0.5, 0.8, 0.9]]
    assert s["tasks_seen"] == 3
    assert s["final_round"] == 6


def test_fwt_is_absent_without_init_acc():
    assert continual_summary(THREE_TASKS, 3)["fwt"] is None


def test_summary_is_plain_json_without_nan():
    s = continual_summary(THREE_TASKS, 3, init_acc=INIT)
    assert json.loads(json.dumps(s, allow_nan=False)) == s

    def plain(value) -> bool:
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (float, int)

    assert all(plain(v) for v in s.values())


def test_run_stopped_after_task_1_uses_the_tasks_seen():
    s = continual_summary(THREE_TASKS[:4], 3, init_acc=INIT)
    assert s["tasks_seen"] == 2
    assert s["acc"] == pytest.approx((0.85 + 0.9) / 2)
    assert s["bwt"] == pytest.approx(0.85 - 0.8)
    # Forgetting is not clipped: task 0 improved, so it is negative.
    assert s["forgetting_max"] == pytest.approx(0.8 - 0.85)
    assert s["fwt"] == pytest.approx(0.2 - 0.1)
    assert s["min_acc"] == pytest.approx(0.4)
    assert s["wc_acc"] == pytest.approx(0.9 / 2 + 0.4 / 2)
    assert s["accuracy_matrix"][2] == [None, None, None]


def test_run_stopped_mid_task_uses_the_final_round():
    s = continual_summary(THREE_TASKS[:5], 3)
    assert s["acc"] == pytest.approx((0.3 + 0.7 + 0.5) / 3)
    assert s["bwt"] == pytest.approx(((0.3 - 0.8) + (0.7 - 0.9)) / 2)
    assert s["forgetting_max"] == pytest.approx(((0.85 - 0.3) + (0.9 - 0.7)) / 2)
    assert s["wc_acc"] == pytest.approx(0.5 / 3 + (2 / 3) * ((0.3 + 0.7) / 2))


def test_single_task():
    records = [rec(1, 0, {0: 0.4}), rec(2, 0, {0: 0.7})]
    s = continual_summary(records, 1, init_acc={"0": 0.1})
    assert s["acc"] == pytest.approx(0.7)
    assert s["bwt"] == 0.0
    assert s["forgetting_max"] == 0.0
    assert s["fwt"] == 0.0
    assert s["min_acc"] is None
    assert s["wc_acc"] == pytest.approx(0.7)
    assert s["windowed_forgetting"] == 0.0


def plateau_run(num_tasks: int, rounds_per_task: int) -> tuple[list[dict], list[float]]:
    """Each task's accuracy rises while it is trained, then stays exactly where it ended."""
    end_acc = [0.6 + 0.1 * t for t in range(num_tasks)]
    records, round_ = [], 0
    for t in range(num_tasks):
        for k in range(1, rounds_per_task + 1):
            round_ += 1
            acc = {j: end_acc[j] for j in range(t)}
            acc[t] = end_acc[t] - 0.1 * (rounds_per_task - k)
            records.append(rec(round_, t, acc, {t + 1: 0.1} if t + 1 < num_tasks else None))
    return records, end_acc


def test_no_forgetting_gives_zero_bwt_and_forgetting():
    records, end_acc = plateau_run(num_tasks=4, rounds_per_task=3)
    s = continual_summary(records, 4)
    assert s["bwt"] == pytest.approx(0.0, abs=1e-12)
    assert s["forgetting_max"] == pytest.approx(0.0, abs=1e-12)
    assert s["windowed_forgetting"] == 0.0
    # The minimum after each task is its task-end accuracy.
    assert s["min_acc"] == pytest.approx(np.mean(end_acc[:3]))
    assert s["min_acc"] > 0
    assert s["acc"] == pytest.approx(np.mean(end_acc))


def test_old_tasks_improving_gives_negative_forgetting_and_positive_bwt():
    # Task 0 ends at 0.5 and keeps improving while task 1 is trained.
    records = [
        rec(1, 0, {0: 0.5}),
        rec(2, 1, {0: 0.6, 1: 0.3}),
        rec(3, 1, {0: 0.7, 1: 0.8}),
    ]
    s = continual_summary(records, 2)
    assert s["bwt"] == pytest.approx(0.2)
    assert s["forgetting_max"] == pytest.approx(-0.2)
    assert s["min_acc"] == pytest.approx(0.6)
    assert s["windowed_forgetting"] == 0.0


@pytest.mark.parametrize(("window", "expected"), [(1, 0.0), (2, 0.2), (3, 0.4), (10, 0.4)])
def test_windowed_forgetting_only_sees_drops_inside_the_window(window, expected):
    records = [rec(r, 0, {0: a}) for r, a in enumerate([0.9, 0.7, 0.5, 0.8], start=1)]
    s = continual_summary(records, 1, window=window)
    assert s["windowed_forgetting"] == pytest.approx(expected)


def test_forgetting_is_at_least_minus_bwt_on_random_runs():
    # max_{l<T-1} R[l, j] >= R[j, j] term by term, so forgetting >= -bwt for any run.
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_tasks = int(rng.integers(2, 7))
        rounds = rng.integers(1, 4, size=num_tasks)
        records, round_ = [], 0
        for t in range(num_tasks):
            for _ in range(rounds[t]):
                round_ += 1
                acc = {j: float(rng.random()) for j in range(t + 1)}
                records.append(rec(round_, t, acc, {t + 1: float(rng.random())}))
        s = continual_summary(records, num_tasks)
        assert s["forgetting_max"] >= s["fgt"] - 1e-12
        r = np.array(s["accuracy_matrix"], dtype=float)
        assert s["acc"] == pytest.approx(np.mean(r[-1]))
        assert s["bwt"] == pytest.approx(np.mean(r[-1, :-1] - np.diag(r)[:-1]))


def test_records_without_acc_are_ignored():
    with_events = [{"event": "start"}, *THREE_TASKS, {"event": "end", "round": 6}]
    assert continual_summary(with_events, 3) == continual_summary(THREE_TASKS, 3)


@pytest.mark.parametrize(
    ("records", "num_tasks", "message"),
    [
        ([], 3, "no evaluation records"),
        ([rec(1, 1, {0: 0.5, 1: 0.5}), rec(2, 0, {0: 0.5})], 3, "goes back"),
        ([rec(1, 3, {0: 0.5})], 3, "outside"),
    ],
)
def test_bad_records_are_rejected(records, num_tasks, message):
    with pytest.raises(ValueError, match=message):
        continual_summary(records, num_tasks)


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="window"):
        continual_summary(THREE_TASKS, 3, window=0)


def test_read_metrics_round_trip_and_cut_off_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in THREE_TASKS]
    path.write_text("\n".join(lines) + "\n\n")
    assert read_metrics(path) == THREE_TASKS

    # A run killed mid-write leaves a partial last line without a newline.
    path.write_text("\n".join(lines) + "\n" + lines[0][:10])
    assert read_metrics(path) == THREE_TASKS


def test_read_metrics_rejects_a_malformed_line_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(THREE_TASKS[0]) + "\n{oops\n" + json.dumps(THREE_TASKS[1]) + "\n")
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


def test_missing_evaluations_are_skipped_not_nan():
    records = [rec(1, 0, {0: 0.8}), rec(2, 1, {1: 0.6})]  # task 0 not evaluated at the end
    s = continual_summary(records, 2)
    assert s["acc"] == pytest.approx(0.6)
    assert s["bwt"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in s.values())


def test_the_error_messages_name_the_round_and_the_tasks() -> None:
    back = [rec(1, 1, {0: 0.5, 1: 0.5}), rec(2, 0, {0: 0.5})]
    with pytest.raises(
        ValueError,
        match=r"^task goes back from 1 to 0 at round 2; continual metrics need tasks trained in "
        r"order$",
    ):
        continual_summary(back, 3)
    with pytest.raises(ValueError, match=r"^round 1 trains task 3, outside \[0, 3\)$"):
        accuracy_matrix([rec(1, 3, {0: 0.5})], 3)
    with pytest.raises(ValueError, match=r"^num_tasks must be >= 1, got 0$"):
        accuracy_matrix(THREE_TASKS, 0)
    with pytest.raises(
        ValueError, match=r"^no evaluation records \(records with an 'acc' key\) to summarise$"
    ):
        continual_summary([{"round": 1, "task": 0}], 3)


def test_the_default_window_is_ten_evaluations() -> None:
    # Task 0 drops by 0.4 at once, and by 1.0 from the evaluation 10 before the last one.
    accs = [1.0] + [0.6] * 9 + [0.0]
    records = [rec(r, 0, {0: a}) for r, a in enumerate(accs, start=1)]
    assert continual_summary(records, 1)["windowed_forgetting"] == pytest.approx(0.6)
    assert continual_summary(records, 1, window=11)["windowed_forgetting"] == pytest.approx(1.0)


def test_a_task_never_evaluated_at_a_task_end_is_left_out_of_forgetting() -> None:
    records = [rec(1, 0, {}), rec(2, 1, {0: 0.5, 1: 0.6})]
    s = continual_summary(records, 2)
    assert s["forgetting_max"] is None and s["bwt"] is None
    assert s["acc"] == pytest.approx(0.55)


def test_wc_acc_needs_the_current_task_in_the_final_record() -> None:
    s = continual_summary([rec(1, 0, {0: 0.5}), rec(2, 1, {0: 0.4})], 2)
    assert s["wc_acc"] is None
    assert s["min_acc"] == pytest.approx(0.4)


def test_read_metrics_skips_blank_lines_anywhere(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in THREE_TASKS]
    path.write_text(lines[0] + "\n\n  \n" + "\n".join(lines[1:]) + "\n")
    assert read_metrics(path) == THREE_TASKS


def test_read_metrics_rejects_a_malformed_middle_line_without_a_final_newline(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(THREE_TASKS[0]) + "\n{oops\n" + json.dumps(THREE_TASKS[1]))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a JSON object"):
        read_metrics(path)
