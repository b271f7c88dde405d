"""Honest outcomes: every lost update is listed with its reason, a round without updates is
flagged, and a run in which no update ever succeeded fails (exit 1, one line, status failed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from fedcl.cli import main
from fedcl.client import app as default
from fedcl.engine.audit import DeletionAudit
from fedcl.engine.loop import _train_step, run_outcome
from fedcl.engine.observers import ProgressObserver, round_lines
from fedcl.testing import InProcessGrid
from tests.engine import slow_app
from tests.engine.runs import read_jsonl

SMALL = [
    "clients.num=4",
    "scenario.num_tasks=1",
    "rounds=2",
    "engine.num_actors=2",
    "train.batch_size=16",
]

broken = ClientApp()


@broken.train()
def train_broken(msg: Message, context: Context) -> Message:
    raise RuntimeError("every client is broken")


broken_in_round_1 = ClientApp()


@broken_in_round_1.train()
def train_broken_in_round_1(msg: Message, context: Context) -> Message:
    if int(msg.content["config"]["server-round"]) == 1:
        raise RuntimeError("down for round 1")
    return default.train(msg, context)


def run_cli(tmp_path: Path, capsys, *overrides: str) -> tuple[int, str, str, Path]:
    """`fedcl run` of the defaults with `overrides`, quiet; (exit code, stdout, stderr, folder)."""
    config = tmp_path / "config.yaml"
    config.write_text("name: outcomes\n")
    out = tmp_path / "run"
    code = main(["run", str(config), *SMALL, *overrides, "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err, out


@pytest.mark.usefixtures("ray_session")
def test_a_run_where_every_client_raises_fails_with_one_line(tmp_path, capsys):
    app = "client.app=tests.engine.test_outcomes:broken"
    code, stdout, stderr, out = run_cli(tmp_path, capsys, app)
    assert code == 1
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    reason = "RuntimeError: every client is broken"
    assert stderr.startswith(
        "fedcl: error: run failed: no client update succeeded in any of the 2 rounds "
        f"(round 1, node 1000: {reason}); run folder: "
    )
    assert stdout == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] in stderr
    assert (summary["client_updates"], summary["client_failures"]) == (0, 8)
    assert summary["rounds_without_updates"] == [1, 2]
    for record in read_jsonl(out / "metrics.jsonl"):
        assert record["no_updates"] is True and record["replies"] == 0
        assert [f["node"] for f in record["failures"]] == [1000, 1001, 1002, 1003]
        assert all(f["reason"] == reason for f in record["failures"])


@pytest.mark.usefixtures("ray_session")
def test_a_run_where_every_reply_times_out_fails_and_lists_the_timeouts(tmp_path, capsys):
    code, _, stderr, out = run_cli(tmp_path, capsys, "engine.timeout_s=0.001")
    late = "timed out after engine.timeout_s=0.001 s"
    assert code == 1 and stderr.count("\n") == 1
    assert f"(round 1, node 1000: {late})" in stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    for record in read_jsonl(out / "metrics.jsonl"):
        assert record["no_updates"] is True
        assert record["failures"] == [{"node": 1000 + c, "reason": late} for c in range(4)]


@pytest.mark.usefixtures("ray_session")
def test_a_run_that_lost_one_round_completes_and_says_which(tmp_path, capsys):
    app = "client.app=tests.engine.test_outcomes:broken_in_round_1"
    code, stdout, stderr, out = run_cli(tmp_path, capsys, app)
    assert code == 0, stderr
    assert "run folder:" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and "error" not in summary
    assert summary["rounds_without_updates"] == [1]
    assert (summary["client_updates"], summary["client_failures"]) == (4, 4)
    first, second = read_jsonl(out / "metrics.jsonl")
    assert first["no_updates"] is True and len(first["failures"]) == 4
    assert "no_updates" not in second and second["failures"] == []


def test_a_slow_client_is_listed_as_timed_out():
    grid = InProcessGrid(
        ["clients.num=2", "scenario.num_tasks=1", "client.app=tests.engine.slow_app:app"]
    )
    grid.cfg.engine.timeout_s = slow_app.DELAY_S / 2
    grid.cfg.engine.sum_on_actors = False
    try:
        arrays = grid.initial_arrays()
        audit = DeletionAudit(grid.scenario, None)
        step = _train_step(grid.cfg, FedAvg(), grid, arrays, 1, np.arange(2), audit, grid.scenario)
        assert grid.take_timed_out() == []  # taken by the round, not left for the next
    finally:
        grid.close()
    late = f"timed out after engine.timeout_s={slow_app.DELAY_S / 2:g} s"
    # In process the clients run one after the other: one queued behind the slow one is late too.
    assert (1000 + slow_app.SLOW, late) in step.problems
    assert all(reason == late for _, reason in step.problems)
    assert step.succeeded == step.sampled - len(step.problems) == 2 - len(step.problems)


def test_a_grid_without_take_timed_out_still_lists_missing_replies():
    grid = InProcessGrid(["clients.num=3", "scenario.num_tasks=1"])
    grid.cfg.engine.sum_on_actors = False
    answer = grid.send_and_receive
    grid.send_and_receive = lambda messages, timeout=None: answer(messages)[:1]
    grid.take_timed_out = None  # as a grid that does not know this method
    try:
        step = _train_step(
            grid.cfg,
            FedAvg(),
            grid,
            grid.initial_arrays(),
            1,
            np.arange(3),
            DeletionAudit(grid.scenario, None),
            grid.scenario,
        )
    finally:
        grid.close()
    assert len(step.problems) == 2 and step.succeeded == 1
    assert all(reason == "timed out after engine.timeout_s=3600 s" for _, reason in step.problems)


def record(server_round: int, failures: int, replies: int, **extra) -> dict:
    failed = [{"node": 1000 + c, "reason": "boom"} for c in range(failures)]
    result = {"round": server_round, "failures": failed, "replies": replies, **extra}
    if not replies:
        result["no_updates"] = True
    return result


@pytest.mark.parametrize(
    ("records", "status", "error"),
    [
        ([record(1, 0, 3), record(2, 0, 3)], "completed", None),
        ([record(1, 3, 0), record(2, 2, 1)], "completed", None),
        ([record(1, 2, 1), record(2, 3, 0)], "completed", None),
        (
            [record(1, 3, 0), record(2, 3, 0)],
            "failed",
            "no client update succeeded in any of the 2 rounds (round 1, node 1000: boom)",
        ),
        (
            [record(1, 0, 0, skipped="0 clients online, the strategy needs 2")],
            "failed",
            "no client update succeeded in any of the 1 rounds "
            "(round 1: 0 clients online, the strategy needs 2)",
        ),
    ],
    ids=["clean", "first-round-lost", "last-round-lost", "all-lost", "all-skipped"],
)
def test_a_run_fails_only_when_no_round_aggregated_an_update(records, status, error):
    outcome = run_outcome(records)
    assert outcome["status"] == status
    assert outcome.get("error") == error
    assert outcome["client_failures"] == sum(len(r["failures"]) for r in records)
    assert outcome["rounds_without_updates"] == [r["round"] for r in records if not r["replies"]]


def test_the_progress_bar_flags_a_round_without_updates(capsys):
    observer = ProgressObserver(rounds=2, show=True, max_lines=2)
    base = {"task": 0, "acc": {"0": 0.1}, "avg_acc": 0.1, "sampled": 3}
    observer.on_round_end({**record(1, 3, 0), **base}, None, None)
    observer.on_round_end({**record(2, 0, 3), **base}, None, None)
    observer.close()
    err = capsys.readouterr().err
    assert "round 1: client 0 (node 1000) failed: boom" in err
    assert "round 1: client 1 (node 1001) failed: boom" in err
    assert "client 2 (node 1002)" not in err
    assert "round 1: 1 more clients failed (see failures in metrics.jsonl)" in err
    assert "round 1: no client update was aggregated (3 failed)" in err
    assert "round 2:" not in err
    assert "ok=3/3" in err


def test_round_lines_say_why_a_round_had_no_updates():
    dropped = record(4, 2, 0, discarded="2 replies were invalid, more than screen.max_rejected=1")
    assert round_lines(dropped)[-1] == (
        "round 4: no client update was aggregated "
        "(2 replies were invalid, more than screen.max_rejected=1)"
    )
    skipped = record(5, 0, 0, skipped="1 clients online, the strategy needs 2")
    assert round_lines(skipped) == [
        "round 5: no client update was aggregated (1 clients online, the strategy needs 2)"
    ]


def test_a_quiet_progress_bar_writes_no_lines(capsys):
    observer = ProgressObserver(rounds=1, show=False)
    base = {"task": 0, "acc": {"0": 0.1}, "avg_acc": 0.1, "sampled": 3}
    observer.on_round_end({**record(1, 3, 0), **base}, None, None)
    observer.close()
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""
