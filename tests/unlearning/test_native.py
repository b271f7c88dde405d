"""`native`: a strategy that removes a contribution exactly says so; prototype averaging's
removal equals recomputation without the data (the oracle), except what its backbone learned
before it froze. A strategy that cannot is refused before the run starts."""

from __future__ import annotations

import pytest

import fedcl
from fedcl.errors import ConfigError
from tests.unlearning.runs import BASE, read_jsonl

# The backbone freezes at the end of task 0 (round 2). Class 5 (task 1, rounds 3-4) is deleted
# at round 5, after the banks hold it. (A client deleted after the freeze loses its banks, but
# the backbone it helped train does not forget: simulations/unlearning_client.yaml measures it.)
EVENTS = "events=[{round: 5, kind: delete, what: class, class: 5}]"


def test_prototype_removal_equals_recomputation_without_the_data(tmp_path, ray_session):
    overrides = [*BASE, EVENTS, "strategy.name=prototypes", "unlearning.method=native"]
    fedcl.run(None, [*overrides, "unlearning.oracle=true"], out=tmp_path / "run")
    (by_class,) = read_jsonl(tmp_path / "run" / "unlearning.jsonl")
    assert by_class["before"]["forget_acc"] > 0.5  # the banks had learned class 5
    assert by_class["l2_to_oracle"] == 0.0
    assert by_class["unlearned"] == by_class["oracle"]
    assert by_class["unlearned"]["forget_acc"] == 0.0  # no prototype of class 5 is left


def test_native_on_a_strategy_that_cannot_remove_exactly_is_refused_before_the_run(tmp_path):
    with pytest.raises(ConfigError) as caught:
        fedcl.run(None, [*BASE, EVENTS, "unlearning.method=native"], out=tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message
    assert "'fedavg' cannot (valid: prototypes)" in message
    assert not (tmp_path / "run").exists()
