"""The deletion audit catches a client that trains on deleted samples: summary.json's
`deletion_audit` (and its recomputation from the run folder) names the rounds and the client."""

from __future__ import annotations

from pathlib import Path

import pytest

import fedcl
from fedcl.engine.audit import recompute_audit
from tests.engine import undeleting_app
from tests.engine.runs import read_jsonl

DELETE_ROUND, ROUNDS = 3, 4
FAULTY = undeleting_app.IGNORES_DELETIONS
OVERRIDES = [
    "clients.num=3",
    f"rounds={ROUNDS}",
    "scenario.num_tasks=1",
    "model.hidden=[16]",
    "engine.num_actors=1",
    "log.progress=false",
    # The faulty client claims the examples it held before the deletion: let it be aggregated.
    "screen.check_examples=false",
    "client.app=tests.engine.undeleting_app:app",
    # Both clients delete half their samples; only the faulty one trains on them afterwards.
    f"events=[{{round: {DELETE_ROUND}, kind: delete, clients: [{FAULTY}, 1], what: samples,"
    " fraction: 0.5}]",
]


@pytest.mark.usefixtures("ray_session")
def test_a_client_training_on_deleted_samples_is_reported_with_round_and_client(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    result = fedcl.run(None, *OVERRIDES, out=out)
    (event,) = [e for e in read_jsonl(out / "events.jsonl") if e["kind"] == "delete"]
    deleted_of_faulty = event["deleted"][str(FAULTY)]
    assert deleted_of_faulty > 0 and event["deleted_samples"] > deleted_of_faulty
    # Every round from the deletion on, the faulty client trained on all its deleted samples (one
    # epoch over all it held in round 1); the honest client 1 never did.
    violations = [
        {"round": r, "client": FAULTY, "samples": deleted_of_faulty}
        for r in range(DELETE_ROUND, ROUNDS + 1)
    ]
    expected = {
        "deleted": event["deleted_samples"],
        "used_after_delete": deleted_of_faulty * len(violations),
        "violations": violations,
    }
    assert result.summary["deletion_audit"] == expected
    assert recompute_audit(out) == expected
