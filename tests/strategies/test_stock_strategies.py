"""Every registered stock Flower strategy runs a round through fedcl's engine (Ray actors, screened
replies, sums on the actors where the strategy allows) and lands where the same Flower strategy
lands in process on the same clients' replies (`fedcl.testing.InProcessGrid`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord

import fedcl
from fedcl.imports import load_object
from fedcl.strategies import describe_strategies
from fedcl.testing import InProcessGrid

CLIENTS = 5  # FedTrimmedAvg's default beta = 0.2 then trims one client at each end
OVERRIDES = [
    f"clients.num={CLIENTS}",
    "rounds=1",
    "scenario.num_tasks=1",
    "model.hidden=[8]",
    "train.max_steps=4",
    "engine.num_actors=1",
    # the clients of a round train together (torch.func): in process they train one by one,
    # which agrees to float32 rounding
    "engine.vectorize=on",
    "log.progress=false",
]
STOCK = {
    info.name: info.target for info in describe_strategies() if info.target.startswith("flwr.")
}
# FedAvg and FedProx run end to end in many other tests (tests/engine/test_run.py,
# test_vectorized_run.py, ...): each run here costs an actor start, so they are left out.
RUN_HERE = sorted(set(STOCK) - {"fedavg", "fedprox"})


def test_the_stock_strategies_are_registered() -> None:
    expected = {"fedadagrad", "fedadam", "fedavg", "fedavgm", "fedmedian", "fedprox"}
    assert expected | {"fedtrimmedavg", "fedyogi"} <= set(STOCK)
    never_run_elsewhere = {"fedadagrad", "fedadam", "fedavgm", "fedmedian", "fedtrimmedavg"}
    assert never_run_elsewhere | {"fedyogi"} <= set(RUN_HERE)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("name", RUN_HERE)
def test_a_stock_strategy_runs_a_round_as_flower_runs_it(name: str, tmp_path: Path) -> None:
    result = fedcl.run(None, *OVERRIDES, f"strategy.name={name}", out=tmp_path / "run")
    (record,) = result.records
    assert result.summary["status"] == "completed"
    assert result.summary["vectorized"]
    assert record["replies"] == CLIENTS and record["failures"] == []

    grid = InProcessGrid(OVERRIDES)
    try:
        strategy = load_object(STOCK[name], what="strategy")()
        start = grid.initial_arrays()
        replies = grid.send_and_receive(strategy.configure_train(1, start, ConfigRecord(), grid))
        expected, _ = strategy.aggregate_train(1, replies)
    finally:
        grid.close()
    assert set(result.arrays.keys()) == set(expected.keys())
    moved = 0.0
    for key in expected:
        got, want = result.arrays[key].numpy(), expected[key].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=key)
        moved += float(np.abs(want - start[key].numpy()).sum())
    assert moved > 0  # the round changed the model
