"""`federaser`: calibration from the rollback state with fewer local epochs, each step scaled to
the recorded update magnitude, moves the model towards the oracle; a deletion that is not of a
whole client stops the run in one line; its options are checked before the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

import fedcl
from fedcl.engine.checkpoint import latest_checkpoint
from fedcl.errors import ConfigError
from fedcl.unlearning import UnlearningError, session
from fedcl.unlearning.federaser import UpdateNorms, calibrated_step
from fedcl.unlearning.measures import l2_distance
from tests.unlearning.runs import BASE, read_jsonl

# Client 2 asks to be forgotten at round 5; it trained from round 1 on. Its data is its own
# (Dirichlet 0.1): removing it matters. (On iid data, one of four clients barely moves FedAvg's
# model, and calibration with half the epochs can land farther from the oracle than `none`.)
CLIENT_2_AT_5 = "events=[{round: 5, kind: delete, clients: [2], what: client}]"
FEDERASER = [
    *BASE,
    "clients.partition=dirichlet",
    "clients.alpha=0.1",
    "train.epochs=2",
    "unlearning.method=federaser",
]


def test_calibration_moves_the_model_towards_the_oracle(tmp_path, ray_session):
    seen = {}
    real = session.Unlearning._run_method

    def spy(self, server_round, events, arrays, *rest):
        result = real(self, server_round, events, arrays, *rest)
        # `none` keeps the model as it is; the oracle ran before the method
        seen.update(kept=arrays, calibrated=result[0], oracle=self.oracles[server_round].arrays)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session.Unlearning, "_run_method", spy)
        fedcl.run(None, [*FEDERASER, CLIENT_2_AT_5, "unlearning.oracle=true"], out=tmp_path / "r")
    (record,) = read_jsonl(tmp_path / "r" / "unlearning.jsonl")
    assert record["cost"]["rolled_back_to"] == 0
    assert record["cost"]["rounds"] == 4  # rounds 1-4, every one recorded
    assert record["cost"]["epochs"] == 1  # ceil(2 × 0.5)
    assert record["l2_to_oracle"] == l2_distance(seen["calibrated"], seen["oracle"])
    none_l2 = l2_distance(seen["kept"], seen["oracle"])
    assert record["l2_to_oracle"] > 0.0  # approximate, not exact
    assert l2_distance(seen["calibrated"], seen["kept"]) > 0.0
    assert record["l2_to_oracle"] < none_l2 / 2
    gap_before = abs(record["before"]["forget_acc"] - record["oracle"]["forget_acc"])
    assert abs(record["gap"]["forget_acc"]) < gap_before
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["deletion_audit"]["used_after_delete"] == 0
    assert summary["unlearning"]["recorded_norms"]["rounds"] == 6


def test_a_deletion_that_is_not_of_a_whole_client_stops_the_run_in_one_line(tmp_path, ray_session):
    run = tmp_path / "run"
    events = "events=[{round: 4, kind: delete, clients: [2], what: samples, fraction: 0.5}]"
    with pytest.raises(UnlearningError) as caught:
        fedcl.run(None, [*FEDERASER, events, "checkpoint.max_overhead=0"], out=run)
    message = str(caught.value)
    assert "\n" not in message
    assert (
        "'federaser'" in message and "[2] of round 4" in message
    )  # timeline index 2: after two task events
    assert "whole clients only; delete event 2 (round 4) deletes samples" in message
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == message
    checkpoint, bad = latest_checkpoint(run)
    assert checkpoint is not None and checkpoint.server_round == 3 and not bad


def test_a_calibrated_step_has_the_recorded_magnitude_and_the_new_direction():
    base = ArrayRecord({"w": Array(np.array([1.0, 2.0], dtype=np.float32))})
    trained = ArrayRecord({"w": Array(np.array([4.0, 6.0], dtype=np.float32))})  # U = (3, 4)
    step = calibrated_step(base, trained, {"w": 10.0})
    assert np.array_equal(step["w"].numpy(), np.array([7.0, 10.0], dtype=np.float32))
    norms = UpdateNorms(interval=2)
    norms.observe(1, base, trained)
    norms.observe(2, base, trained)
    assert norms.norms(1) is None and norms.norms(2) == {"w": 5.0}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["unlearning.calibration_ratio=0"], "unlearning.calibration_ratio must be"),
        (["unlearning.calibration_ratio=1.5"], "unlearning.calibration_ratio must be"),
        (["unlearning.calibration_interval=0"], "unlearning.calibration_interval must be"),
        (["unlearning.calibration_ration=0.5"], "did you mean 'unlearning.calibration_ratio'"),
    ],
)
def test_federaser_options_are_checked_in_one_line_before_the_run(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as caught:
        fedcl.run(None, [*FEDERASER, CLIENT_2_AT_5, *overrides], out=tmp_path / "run")
    assert "\n" not in str(caught.value)
    assert expected in str(caught.value)
    assert not (tmp_path / "run").exists()
