"""A reply that misses send_and_receive's timeout is dropped, and the grid goes on; actors that
cannot be placed give a clear error, not a hang.

No race against the clock: the late client waits at a gate the test opens (`gated_app`), so it
misses the timeout for certain, and nothing asserts how fast any other client answers.
"""

from __future__ import annotations

import pytest
import ray
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedcl.config import load_config, to_container
from fedcl.engine.flower_compat import make_run, node_id_of, set_server_identity
from fedcl.engine.grid import RayGrid
from fedcl.engine.loop import start_client_actors
from fedcl.errors import FedclError
from fedcl.models import build_model
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.scenario import build_scenario
from tests.engine import gated_app

pytestmark = pytest.mark.usefixtures("ray_session")
FAST, LATE = node_id_of(0), node_id_of(gated_app.GATED)


def train_messages(
    initial: ArrayRecord, nodes: list[int], server_round: int, gate: str | None = None
) -> list[Message]:
    config = ConfigRecord({"server-round": server_round})
    if gate is not None:
        config[gated_app.GATE_KEY] = gate
    content = RecordDict({"arrays": initial, "config": config})
    return [Message(content, node, MessageType.TRAIN) for node in nodes]


def test_a_timed_out_reply_is_dropped_and_the_grid_goes_on() -> None:
    cfg = load_config(
        None,
        ["clients.num=2", "scenario.num_tasks=1", "rounds=3", "model.hidden=[8]"]
        + ["client.app=tests.engine.gated_app:app"],
    )
    dataset = load_dataset("digits")
    scenario = build_scenario(cfg, dataset)
    set_server_identity(run_id=8)
    actors = start_client_actors(to_container(cfg), dataset, scenario, run_id=8, num_actors=2)
    gate = gated_app.Gate.options(name="grid-timeout-gate").remote()
    try:
        grid = RayGrid(actors, [node_id_of(c) for c in range(2)], make_run(8))
        model = build_model("mlp", dataset.input_shape, dataset.num_classes, hidden=[8])
        initial = ArrayRecord(model.state_dict())
        nodes = [FAST, LATE]

        first = train_messages(initial, nodes, 1, gate="grid-timeout-gate")
        replies = grid.send_and_receive(first, timeout=1.0)
        answered = [r.metadata.src_node_id for r in replies]
        timed_out = grid.take_timed_out()
        assert LATE not in answered and LATE in timed_out  # the gated client cannot answer
        assert sorted(answered + timed_out) == sorted(nodes)  # every node either way, once
        late_request = first[1].metadata.message_id

        ray.get(gate.open.remote())  # the late reply now comes: it must be dropped
        second = train_messages(initial, nodes, 2)
        replies = grid.send_and_receive(second, timeout=120.0)
        assert [r.metadata.src_node_id for r in replies] == nodes
        assert [r.metadata.reply_to_message_id for r in replies] == [
            m.metadata.message_id for m in second
        ]
        assert not any(r.has_error() for r in replies)
        assert grid.take_timed_out() == []
        # the late reply is gone for good: not pulled later, not slipped into a later round
        assert list(grid.pull_messages([late_request])) == []
        third = train_messages(initial, nodes, 3)
        replies = grid.send_and_receive(third, timeout=120.0)
        assert [r.metadata.reply_to_message_id for r in replies] == [
            m.metadata.message_id for m in third
        ]
        # the late client's state went on: it trained in rounds 1 (late), 2 and 3
        assert replies[1].content["metrics"]["train-count"] == 3
    finally:
        for actor in [*actors, gate]:
            ray.kill(actor)


def test_actors_that_cannot_be_placed_give_a_clear_error_not_a_hang() -> None:
    cfg = load_config(None, ["clients.num=2", "engine.start_timeout_s=3"])
    dataset = load_dataset("digits")
    scenario = build_scenario(cfg, dataset)
    config = to_container(cfg)
    config["engine"]["num_cpus_per_actor"] = 64  # more than this machine has: never placed
    with pytest.raises(FedclError, match="not ready within engine.start_timeout_s=3 s"):
        start_client_actors(config, dataset, scenario, run_id=9, num_actors=1)
