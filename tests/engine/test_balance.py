"""Balanced pushes (`RayGrid(balance=True)`, `engine.balance`): a push's messages are spread over
the actors with at most one message between any two, and a node that moves takes its
`Context.state` along, so clients behave as if they had never moved."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
from flwr.app import ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcl.config import load_config, to_container
from fedcl.engine.flower_compat import make_run, node_id_of, set_server_identity
from fedcl.engine.grid import RayGrid, balanced_moves
from fedcl.engine.loop import actor_factory
from fedcl.engine.recovery import ActorRecovery
from fedcl.models import build_model
from fedcl.protocol import STATE_KEY
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.scenario import build_scenario
from tests.engine.runs import read_jsonl, run_with_actors
from tests.engine.test_grid import train_messages

NUM_CLIENTS = 12


@settings(max_examples=200, deadline=None)
@given(
    num_actors=st.integers(1, 5),
    pushes=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 4)), min_size=1, max_size=60),
)
def test_moves_even_out_the_load_with_the_fewest_moves(num_actors, pushes):
    nodes = np.array([node for node, _ in pushes], np.int64)
    owner_of = {node: actor % num_actors for node, actor in pushes}  # one actor per node
    actors = np.array([owner_of[node] for node in nodes.tolist()], np.int64)
    moves = balanced_moves(nodes, actors, num_actors)
    assert moves == balanced_moves(nodes, actors, num_actors)  # deterministic
    after = np.array([moves.get(node, owner_of[node]) for node in nodes.tolist()])
    before_loads = np.bincount(actors, minlength=num_actors)
    loads = np.bincount(after, minlength=num_actors)
    assert all(moves[node] != owner_of[node] for node in moves)
    if len(set(nodes.tolist())) == len(nodes):  # one message per node: always reachable
        assert loads.max() - loads.min() <= 1
        # The fewest moves: the remainder's extra messages stay on the busiest actors, and
        # every other actor gives only what it has above its share.
        base, extra = divmod(len(nodes), num_actors)
        shares = np.full(num_actors, base)
        shares[np.argsort(-before_loads, kind="stable")[:extra]] += 1
        assert len(moves) == np.maximum(before_loads - shares, 0).sum()
    # Moves never make the busiest actor busier, nor take from an actor below its share.
    assert loads.max() <= before_loads.max()
    for node in moves:
        assert before_loads[owner_of[node]] > len(nodes) // num_actors


@contextmanager
def balanced_grid(num_clients: int, run_id: int, *, recover: bool = False) -> Iterator[RayGrid]:
    """A balancing RayGrid of `num_clients` nodes over 2 fresh actors (with `recover`: which a
    recovery replaces when they die), killed afterwards."""
    cfg = load_config(
        None, [f"clients.num={num_clients}", "scenario.num_tasks=1", "engine.vectorize=off"]
    )
    dataset = load_dataset("digits")
    scenario = build_scenario(cfg, dataset)
    set_server_identity(run_id=run_id)
    factory = actor_factory(to_container(cfg), dataset, scenario, run_id, None)
    node_ids = node_id_of(np.arange(num_clients))
    recovery = ActorRecovery(factory, node_ids, max_retries=1) if recover else None
    grid = RayGrid(factory.start(2), node_ids, make_run(run_id), recovery=recovery, balance=True)
    model = build_model("mlp", dataset.input_shape, dataset.num_classes)
    grid.initial = ArrayRecord(model.state_dict())
    try:
        yield grid
    finally:
        for actor in grid.actors:
            ray.kill(actor)


def held_states(grid: RayGrid) -> list[dict[int, int]]:
    """Per actor: the train count each node it holds a context for has in its state."""
    exported = ray.get([actor.export_states.remote() for actor in grid.actors])
    return [{node: state[STATE_KEY]["train-count"] for node, state in e.items()} for e in exported]


def test_moved_clients_keep_their_state_and_live_on_one_actor(ray_session):
    with balanced_grid(NUM_CLIENTS, run_id=7) as grid:
        moved_clients_keep_their_state(grid)


def moved_clients_keep_their_state(grid: RayGrid) -> None:
    rng = np.random.default_rng(3)
    counts: dict[int, int] = {}
    first_placement = [grid.actor_of(n) for n in grid.get_node_ids()]
    # Round 1: only nodes of actor 0 (even partitions); later rounds: random samples.
    schedule = [[node_id_of(c) for c in range(0, NUM_CLIENTS, 2)]]
    schedule += [sorted(rng.choice(grid.node_ids, 7, replace=False).tolist()) for _ in range(8)]
    grid.take_loads()
    for server_round, nodes in enumerate(schedule, start=1):
        replies = grid.send_and_receive(train_messages(grid, nodes, server_round))
        loads = grid.take_loads()
        assert sum(loads) == len(nodes) and max(loads) - min(loads) <= 1
        for reply in replies:
            assert not reply.has_error()
            node = reply.metadata.src_node_id
            counts[node] = counts.get(node, 0) + 1
            assert reply.content["metrics"]["train-count"] == counts[node]  # state moved along
    held = held_states(grid)
    assert not set(held[0]) & set(held[1])  # a node's context lives on one actor only
    assert held[0] | held[1] == counts
    for actor, states in enumerate(held):  # and on the actor the grid routes it to
        assert all(grid.actor_of(node) == actor for node in states)
        assert set(states) <= set(grid.nodes_of(actor).tolist())
    assert [grid.actor_of(n) for n in grid.get_node_ids()] != first_placement


def test_clients_whose_source_died_fail_without_a_recovery(ray_session):
    with balanced_grid(6, run_id=8) as grid:
        ray.kill(grid.actors[0])
        nodes = [node_id_of(c) for c in (0, 2, 4)]  # all on the dead actor 0
        replies = grid.send_and_receive(train_messages(grid, nodes, 1))
        reasons = [reply.error.reason for reply in replies]
        assert all(reason.startswith("actor failed") for reason in reasons)
        # Node 1004 moved to actor 1, whose call found its state missing.
        assert "actor 0, which held the client's state, died" in reasons[2]
        assert [grid.actor_of(n) for n in nodes] == [0, 0, 1]
        assert grid.take_loads() == [2, 1]


def test_clients_whose_source_died_are_restored_where_they_moved(ray_session):
    with balanced_grid(6, run_id=9, recover=True) as grid:
        everyone = grid.get_node_ids()
        assert not any(
            r.has_error() for r in grid.send_and_receive(train_messages(grid, everyone, 1))
        )
        ray.kill(grid.actors[0])
        nodes = [node_id_of(c) for c in (0, 2, 4)]  # all on the dead actor 0
        replies = grid.send_and_receive(train_messages(grid, nodes, 2))
        assert not any(reply.has_error() for reply in replies)
        # Their states were rebuilt (the default ClientApp's): their second training, not a first.
        assert [reply.content["metrics"]["train-count"] for reply in replies] == [2, 2, 2]
        reports = {tuple(r["clients"]): r for r in grid.take_replacements()}
        assert set(reports) == {(0, 2), (4,)}
        assert reports[(4,)]["moved_to"] == 1 and reports[(4,)]["actor"] == 0
        assert reports[(4,)]["state"]["rebuilt"] == 1


def test_balanced_runs_give_the_metrics_of_one_actor(tmp_path, ray_session):
    overrides = [
        "clients.num=8",
        "rounds=6",
        "scenario.num_tasks=3",
        "train.replay_size=20",  # a client that lost its state would train without its replay
        "strategy.name=fedavg",
        "strategy.fraction_train=0.5",
        "engine.vectorize=off",
        "log.progress=false",
    ]
    _, one = run_with_actors(overrides, tmp_path / "one", 1)
    _, balanced = run_with_actors(overrides, tmp_path / "balanced", 2)
    _, sticky = run_with_actors([*overrides, "engine.balance=false"], tmp_path / "sticky", 2)
    assert balanced == one == sticky
    assert all(sorted(load) == [2, 2] for load in actor_loads(tmp_path / "balanced"))
    assert any(sorted(load) != [2, 2] for load in actor_loads(tmp_path / "sticky"))  # so moves


def actor_loads(run: Path) -> list[list[int]]:
    """Each round's `messages_per_actor` in the run folder `run`."""
    return [r["messages_per_actor"] for r in read_jsonl(run / "metrics.jsonl")]
