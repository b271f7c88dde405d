"""The RayGrid on its own: sticky placement keeps client state; Flower's message contract holds."""

from __future__ import annotations

import pytest
import ray
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from fedcl.config import load_config, to_container
from fedcl.engine.flower_compat import make_run, node_id_of, set_server_identity
from fedcl.engine.grid import RayGrid
from fedcl.engine.loop import start_client_actors
from fedcl.models import build_model
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.scenario import build_scenario

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def grid():
    cfg = load_config(None, ["clients.num=5", "scenario.num_tasks=1", "rounds=3"])
    dataset = load_dataset("digits")
    scenario = build_scenario(cfg, dataset)
    set_server_identity(run_id=7)
    actors = start_client_actors(to_container(cfg), dataset, scenario, run_id=7, num_actors=2)
    model = build_model("mlp", dataset.input_shape, dataset.num_classes)
    grid = RayGrid(actors, [node_id_of(c) for c in range(5)], make_run(7))
    grid.initial = ArrayRecord(model.state_dict())
    yield grid
    for actor in actors:
        ray.kill(actor)


def train_messages(grid: RayGrid, node_ids: list[int], server_round: int) -> list[Message]:
    content = RecordDict(
        {"arrays": grid.initial, "config": ConfigRecord({"server-round": server_round})}
    )
    return [Message(content, node, MessageType.TRAIN) for node in node_ids]


def test_client_state_persists_on_its_actor_across_rounds(grid):
    schedule = [[1000, 1001, 1003], [1000, 1002], [1000, 1001, 1004], [1003]]
    seen: dict[int, int] = {}
    for server_round, nodes in enumerate(schedule, start=1):
        replies = grid.send_and_receive(train_messages(grid, nodes, server_round))
        assert [r.metadata.src_node_id for r in replies] == nodes
        for reply in replies:
            node = reply.metadata.src_node_id
            seen[node] = seen.get(node, 0) + 1
            assert reply.content["metrics"]["train-count"] == seen[node]


def test_replies_answer_their_requests(grid):
    messages = train_messages(grid, [1002, 1004], server_round=1)
    replies = grid.send_and_receive(messages)
    for message, reply in zip(messages, replies, strict=True):
        assert reply.metadata.reply_to_message_id == message.metadata.message_id
        assert reply.metadata.dst_node_id == message.metadata.src_node_id
        assert reply.metadata.message_id  # replies get ids too
    assert grid.get_node_ids() == [node_id_of(c) for c in range(5)]


def test_placement_is_sticky_and_spread(grid):
    placement = [grid.actor_of(node) for node in grid.get_node_ids()]
    assert placement == [0, 1, 0, 1, 0]
