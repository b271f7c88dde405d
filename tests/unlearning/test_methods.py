"""The approximate methods and a user's method by import path, run end to end: what they do is
recorded, no deleted sample is trained on, and a method that raises stops the run cleanly."""

from __future__ import annotations

import json

import pytest

import fedcl
from fedcl.engine.checkpoint import latest_checkpoint
from fedcl.unlearning import UnlearningError
from tests.unlearning.runs import BASE, read_jsonl

CLASS_1_AT_4 = "events=[{round: 4, kind: delete, what: class, class: 1}]"


def test_bounded_ascent_then_finetune_forgets_without_training_on_deleted_data(
    tmp_path, ray_session
):
    overrides = [*BASE, CLASS_1_AT_4, "unlearning.method=ascent", "unlearning.rounds=1"]
    fedcl.run(None, [*overrides, "unlearning.ascent_lr=0.05"], out=tmp_path / "run")
    (record,) = read_jsonl(tmp_path / "run" / "unlearning.jsonl")
    assert record["method"] == "ascent"
    assert record["log"]["ascent_clients"] == 4  # every client held class 1
    assert record["cost"]["rounds"] == 1
    assert record["unlearned"]["forget_acc"] <= record["before"]["forget_acc"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["deletion_audit"]["used_after_delete"] == 0
    assert summary["status"] == "completed"


def test_a_method_that_raises_stops_the_run_naming_it_and_keeps_the_last_checkpoint(
    tmp_path, ray_session
):
    run = tmp_path / "run"
    method = "tests.unlearning.hooks:explode"
    with pytest.raises(UnlearningError) as caught:
        overrides = [*BASE, CLASS_1_AT_4, "checkpoint.max_overhead=0"]  # one every round
        fedcl.run(None, [*overrides, f"unlearning.method={method}"], out=run)
    message = str(caught.value)
    assert "\n" not in message
    assert f"'{method}'" in message and "round 4" in message and "planted failure" in message
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == message
    checkpoint, bad = latest_checkpoint(run)
    assert checkpoint is not None and checkpoint.server_round == 3 and not bad
    assert [r["round"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
