"""`sharded` is exact and cheap: a deletion retrains only the shards that held the data, from
their slice, and the result equals the sharded run that never had the data, bit for bit; the
run's metrics are the shards' averaged logits; what cannot be sharded is refused before the run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fedcl
from fedcl.config import load_config, to_container
from fedcl.errors import ConfigError
from fedcl.models import model_from_config
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.scenario import build_scenario
from fedcl.unlearning import session
from fedcl.unlearning.sharded import evaluation_model, shard_assignment, unpack
from tests.unlearning.runs import BASE, read_jsonl

SHARDED = [*BASE, "unlearning.method=sharded", "unlearning.num_shards=2"]
# Tasks: classes 0-3 (rounds 1-2), 4-6 (3-4), 7-9 (5-6); slices end at rounds 0, 2, 4.
# Class 1 is deleted everywhere at round 4 (both shards, from slice 0); at round 5 client 2
# deletes its class 5 (task 1, first trained in round 3): only client 2's shard retrains, from
# slice 2, over the history the first deletion replayed.
EVENTS = (
    "events=[{round: 4, kind: delete, what: class, class: 1},"
    " {round: 5, kind: delete, clients: [2], what: class, class: 5}]"
)
SHARD_OF_2 = int(shard_assignment(4, 2, 0)[2])


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, ray_session):
    """The run, with what each call of `sharded.unlearn` got and gave back."""
    calls = []
    real = session.unlearn_shards

    def spy(store, parts, scenario, events, absent, server_round, arrays, *rest):
        result = real(store, parts, scenario, events, absent, server_round, arrays, *rest)
        calls.append((server_round, arrays, result[0]))
        return result

    out = tmp_path_factory.mktemp("sharded") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session, "unlearn_shards", spy)
        result = fedcl.run(None, [*SHARDED, EVENTS, "unlearning.oracle=true"], out=out)
    return out, result, calls


def test_a_deletion_retrains_only_the_shards_that_held_the_data_from_their_slice(sharded_run):
    out, _, calls = sharded_run
    first, second = read_jsonl(out / "unlearning.jsonl")
    assert first["cost"]["shards"] == [0, 1]
    assert first["cost"]["rolled_back_to"] == {"0": 0, "1": 0}
    assert first["cost"]["rounds_per_shard"] == {"0": 3, "1": 3}  # rounds 1-3, each shard
    assert second["cost"]["shards"] == [SHARD_OF_2]
    assert second["cost"]["rolled_back_to"] == {str(SHARD_OF_2): 2}  # the end of task 0
    assert second["cost"]["rounds"] == 2  # rounds 3 and 4
    assert second["cost"]["seconds"] > 0
    (_, before, after) = calls[1]
    other = 1 - SHARD_OF_2
    assert before.keys() == after.keys()
    for name, array in unpack(before, other).items():  # the other shard: not touched
        assert unpack(after, other)[name].numpy().tobytes() == array.numpy().tobytes()
    changed = [
        not np.array_equal(unpack(after, SHARD_OF_2)[n].numpy(), a.numpy())
        for n, a in unpack(before, SHARD_OF_2).items()
    ]
    assert any(changed)


def test_the_retrained_shard_equals_the_shard_trained_without_the_data_bitwise(sharded_run):
    # The oracle is the sharded run with the deleted data absent from round 1: its shards are
    # the shards trained without the data from the start. The float64 L2 over every shard's
    # float32 arrays is 0.0 only when every one is the same bits.
    out, _, _ = sharded_run
    for record in read_jsonl(out / "unlearning.jsonl"):
        assert record["l2_to_oracle"] == 0.0
        assert record["unlearned"] == record["oracle"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["unlearning"]["final"]["l2_to_oracle"] == 0.0
    assert summary["deletion_audit"]["used_after_delete"] == 0
    assert summary["unlearning"]["slice_states"]["written"] > 0
    assert not list((out / "unlearning" / "slices").glob("shard_*/checkpoints/round_*"))


def test_the_run_is_scored_on_the_shards_averaged_logits(sharded_run):
    _, result, _ = sharded_run
    cfg = load_config(None, SHARDED)
    container = to_container(cfg)
    dataset = load_dataset("digits", seed=0)
    scenario = build_scenario(cfg, dataset)
    logits = []
    for shard in range(2):
        model = model_from_config(container, dataset.input_shape, dataset.num_classes)
        model.load_state_dict(unpack(result.arrays, shard).to_torch_state_dict())
        ids = scenario.test_indices[0]
        with torch.no_grad():
            logits.append(model(torch.as_tensor(dataset.x_test[ids])))
    by_hand = ((logits[0] + logits[1]) / 2).argmax(dim=1).numpy() == dataset.y_test[ids]
    assert result.records[-1]["acc"]["0"] == pytest.approx(by_hand.mean(), abs=1e-12)
    single = logits[0].argmax(dim=1).numpy() == dataset.y_test[ids]
    assert not np.array_equal(by_hand, single)  # the ensemble is not one shard's model


@pytest.mark.parametrize("aggregate", ["logits", "vote"])
def test_the_ensemble_averages_logits_or_counts_votes(aggregate):
    cfg = load_config(
        None, [*SHARDED, "unlearning.num_shards=3", f"unlearning.aggregate={aggregate}"]
    )
    container = to_container(cfg)
    ensemble = evaluation_model(cfg, container, (64,), 10)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in ensemble.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    x = torch.randn(50, 64, generator=generator)
    with torch.no_grad():
        each = [member(x) for member in ensemble.shards]
        got = ensemble(x)
    if aggregate == "logits":
        torch.testing.assert_close(got, (each[0] + each[1] + each[2]) / 3, rtol=0, atol=1e-6)
    else:
        votes = np.zeros((50, 10))
        for logits in each:
            votes[np.arange(50), logits.argmax(dim=1).numpy()] += 1
        assert np.array_equal(got.argmax(dim=1).numpy(), votes.argmax(axis=1))
        assert np.array_equal(np.argsort(-got.numpy(), kind="stable")[:, 0], votes.argmax(axis=1))


def test_one_shard_is_the_unsharded_run(tmp_path, ray_session):
    plain = fedcl.run(None, [*BASE, "rounds=3"], out=tmp_path / "plain")
    one = fedcl.run(None, [*SHARDED, "rounds=3", "unlearning.num_shards=1"], out=tmp_path / "one")
    assert unpack(one.arrays, 0).keys() == plain.arrays.keys()
    for name, array in plain.arrays.items():
        assert unpack(one.arrays, 0)[name].numpy().tobytes() == array.numpy().tobytes()
    assert [r["acc"] for r in one.records] == [r["acc"] for r in plain.records]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["unlearning.num_shard=2"], "unknown config key 'unlearning.num_shard'"),
        (["unlearning.aggregate=max"], "unknown unlearning.aggregate 'max'; valid: logits, vote"),
        (["unlearning.num_shards=5"], "unlearning.num_shards (5) must not exceed clients.num (4)"),
        (["unlearning.num_shards=0"], "unlearning.num_shards must be"),
        (["unlearning.num_shards=3"], "leaves shards of 1 of the 4 clients, fewer than"),
        (["strategy.name=fot"], "'fot' has them (valid: fedadagrad, fedadam, fedavg,"),
    ],
)
def test_what_cannot_be_sharded_is_refused_in_one_line_before_the_run(
    tmp_path, overrides, expected
):
    with pytest.raises(ConfigError) as caught:
        fedcl.run(None, [*SHARDED, *overrides], out=tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message
    assert expected in message
    assert not (tmp_path / "run").exists()
