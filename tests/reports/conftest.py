"""One real multi-seed run shared by the reports tests (runs cost seconds; Ray is shared)."""

from __future__ import annotations

import pytest

import fedcl

# Tiny: 4 clients, 2 tasks of digits, 4 rounds; a drift at round 3 and a deletion at round 4,
# so a report has events to name.
TINY = [
    "name=tiny-reports",
    "clients.num=4",
    "rounds=4",
    "scenario.num_tasks=2",
    "model.hidden=[32]",
    "engine.num_actors=1",
    "engine.vectorize=off",
    "checkpoint.every=0",
    "log.trained_samples=false",
    "events=[{round: 3, kind: drift, clients: [0, 1], type: label_swap, pairs: [[0, 1]]},"
    "{round: 4, kind: delete, clients: [2], what: samples, fraction: 0.5}]",
]


@pytest.fixture(scope="session")
def seeds_run(tmp_path_factory, ray_session):
    """`fedcl.run_seeds` of the tiny config over seeds 0 and 1 (its `SeedsResult`)."""
    out = tmp_path_factory.mktemp("reports") / "seeds"
    return fedcl.run_seeds(None, *TINY, seeds=[0, 1], out=out, progress=False)
