"""An actor whose clients' training together fails part-way records each client's training once."""

from __future__ import annotations

import logging

import ray
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import MessageType

import fedcl.client.app as client_app
from fedcl.config import load_config, to_container
from fedcl.engine.actor import ClientActor
from fedcl.engine.flower_compat import assign_message_id, node_id_of, set_server_identity
from fedcl.engine.packing import pack
from fedcl.models import model_from_config
from fedcl.protocol import ARRAYS, PROXIMAL_MU, SERVER_ROUND, STATE_KEY
from fedcl.scenario.builder import build_scenario
from fedcl.scenario.datasets import load_dataset

CLIENTS = 6


def test_a_group_that_cannot_train_together_falls_back_without_double_records(
    ray_session, monkeypatch, caplog
):
    cfg = load_config(
        None,
        [
            "dataset.name=gaussian",
            f"clients.num={CLIENTS}",
            "scenario.num_tasks=1",
            "engine.vectorize=on",
            "train.replay_size=4",
        ],
    )
    data = load_dataset("gaussian", seed=0)
    scenario = build_scenario(cfg, data)
    config = to_container(cfg)
    set_server_identity(7)
    actor = ClientActor(
        config, scenario, data.x_train, data.y_train, data.input_shape, data.num_classes, 7
    )
    arrays = ArrayRecord(model_from_config(config, data.input_shape, data.num_classes).state_dict())
    # Two FedProx μ: two groups, trained together one after the other.
    contents = {
        mu: RecordDict({ARRAYS: arrays, "config": ConfigRecord({SERVER_ROUND: 1, PROXIMAL_MU: mu})})
        for mu in (0.0, 0.5)
    }
    batch = []
    for client in range(CLIENTS):
        mu = 0.0 if client % 2 else 0.5
        message = Message(
            contents[mu], dst_node_id=node_id_of(client), message_type=MessageType.TRAIN
        )
        assign_message_id(message)
        batch.append((message.metadata, int(mu * 10)))
    refs = {int(mu * 10): ray.put(pack(content)) for mu, content in contents.items()}

    trained_together = client_app.train_clients_stacked
    calls = []

    def second_group_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cannot train this group together")
        return trained_together(*args, **kwargs)

    monkeypatch.setattr(client_app, "train_clients_stacked", second_group_fails)
    with caplog.at_level(logging.WARNING, logger="fedcl.engine.actor"):
        result = actor.run_batch(batch, refs)

    assert len(calls) == 2
    replies = result.replies
    assert not any(reply.has_error() for reply in replies)
    vectorized = [
        int(next(iter(r.content.metric_records.values()))["train-vectorized"]) for r in replies
    ]
    assert sorted(vectorized) == [0, 0, 0, 1, 1, 1]  # one group together, the other alone
    for client in range(CLIENTS):
        state = actor.context(node_id_of(client)).state[STATE_KEY]
        assert state["train-count"] == 1, client
    warnings = [r for r in caplog.records if "training failed" in r.getMessage()]
    assert len(warnings) == 1 and "cannot train this group together" in warnings[0].getMessage()
