"""A reply that misses send_and_receive's timeout is dropped, and the grid goes on."""

from __future__ import annotations

import pytest
import ray
from flwr.app import ArrayRecord

from fedcl.config import load_config, to_container
from fedcl.engine.flower_compat import make_run, node_id_of, set_server_identity
from fedcl.engine.grid import RayGrid
from fedcl.engine.loop import start_client_actors
from fedcl.errors import FedclError
from fedcl.models import build_model
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.scenario import build_scenario
from tests.engine import slow_app
from tests.engine.test_grid import train_messages

pytestmark = pytest.mark.usefixtures("ray_session")


def test_a_timed_out_reply_is_dropped_and_the_grid_goes_on():
    overrides = ["clients.num=2", "scenario.num_tasks=1", "rounds=3"]
    cfg = load_config(None, [*overrides, "client.app=tests.engine.slow_app:app"])
    dataset = load_dataset("digits")
    scenario = build_scenario(cfg, dataset)
    set_server_identity(run_id=8)
    actors = start_client_actors(to_container(cfg), dataset, scenario, run_id=8, num_actors=2)
    try:
        grid = RayGrid(actors, [node_id_of(c) for c in range(2)], make_run(8))
        model = build_model("mlp", dataset.input_shape, dataset.num_classes)
        grid.initial = ArrayRecord(model.state_dict())
        nodes = [1000, 1000 + slow_app.SLOW]
        warm = grid.send_and_receive(train_messages(grid, nodes, 2), timeout=60.0)
        assert len(warm) == 2  # both actors have imported and built everything once
        first = grid.send_and_receive(train_messages(grid, nodes, 1), timeout=slow_app.DELAY_S / 2)
        assert [r.metadata.src_node_id for r in first] == [1000]  # the slow client missed it
        second = grid.send_and_receive(train_messages(grid, nodes, 3), timeout=60.0)
        assert [r.metadata.src_node_id for r in second] == nodes
        assert not grid._replies and not grid._abandoned  # the late reply was dropped, not kept
    finally:
        for actor in actors:
            ray.kill(actor)


def test_actors_that_cannot_be_placed_give_a_clear_error_not_a_hang():
    cfg = load_config(None, ["clients.num=2", "engine.start_timeout_s=3"])
    dataset = load_dataset("digits")
    scenario = build_scenario(cfg, dataset)
    config = to_container(cfg)
    config["engine"]["num_cpus_per_actor"] = 64  # more than this machine has: never placed
    with pytest.raises(FedclError, match="not ready within engine.start_timeout_s=3 s"):
        start_client_actors(config, dataset, scenario, run_id=9, num_actors=1)
