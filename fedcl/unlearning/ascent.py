"""Bounded gradient ascent on the forget set: the client half (a query handler on every actor)
and the server half (ask the affected clients, average what they send back).

A client ascends the cross-entropy of its deleted samples (as it held them just before the
deletion) from the global model, for `epochs` epochs of plain SGD with a negated step, and
projects the change onto the L2 ball of radius `bound` around the global model, so the ascent
cannot run off (Halimi et al., 2022, bound the same way).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedcl.client import client_of, current_runtime, single_record, to_array_record
from fedcl.client.training import train_local
from fedcl.engine.flower_compat import node_id_of
from fedcl.protocol import ARRAYS, METRICS, NUM_EXAMPLES, SERVER_ROUND
from fedcl.seeding import derive_seed
from fedcl.strategies.base import query_nodes
from fedcl.unlearning.data_absent import sample_tasks

ASCENT_QUERY = "query.fedcl_unlearning_ascent"
ASCENT_CONFIG = "fedcl.unlearning.ascent"
IDS, LR, EPOCHS, BOUND = "sample-ids", "lr", "epochs", "bound"


def project(start: list[torch.Tensor], params: list[torch.Tensor], bound: float) -> float:
    """Pull `params` back onto the L2 ball of radius `bound` around `start` (in place); return
    the norm of the change before projection."""
    with torch.no_grad():
        deltas = [p - s for p, s in zip(params, start, strict=True)]
        norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in deltas)))
        if norm > bound:
            for p, s, d in zip(params, start, deltas, strict=True):
                p.copy_(s + d * (bound / norm))
    return norm


def ascend(msg: Message, context: Context) -> Message:
    """The client half: ascend the loss on the sample ids the message names, bounded."""
    runtime = current_runtime()
    scenario = runtime.scenario
    config = single_record(msg.content.config_records, "ConfigRecord")
    server_round = int(config[SERVER_ROUND])
    client = client_of(context)
    ids = np.frombuffer(config[IDS], dtype="<i8").copy()
    tasks = sample_tasks(scenario, client, ids)
    concept = scenario.concept(client, max(server_round - 1, 0))
    view = scenario.view(runtime.x_train, runtime.y_train, ids, tasks, concept)
    model = runtime.load_model(single_record(msg.content.array_records, "ArrayRecord"))
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    train_local(
        model,
        view.x,
        view.y,
        epochs=int(config[EPOCHS]),
        batch_size=int(runtime.config["train"]["batch_size"]),
        lr=-float(config[LR]),  # a negated SGD step ascends the loss
        seed=derive_seed(runtime.seed, "unlearning-ascent", client, server_round),
        class_mask=scenario.class_mask(view.tasks, runtime.num_classes),
        device=runtime.device,
    )
    norm = project(start, params, float(config[BOUND]))
    content = RecordDict(
        {
            ARRAYS: to_array_record(model.state_dict()),
            METRICS: MetricRecord({NUM_EXAMPLES: len(view.y), "ascent-norm": norm}),
        }
    )
    return Message(content, reply_to=msg)


def ascend_on_clients(
    grid: Grid,
    arrays: ArrayRecord,
    forget: dict[int, np.ndarray],
    server_round: int,
    *,
    lr: float,
    epochs: int,
    bound: float,
) -> tuple[ArrayRecord, int]:
    """Ask each client of `forget` (client -> its deleted ids) to ascend on its ids; return the
    average of the models they send back, weighted by their forget samples, and how many
    answered (`arrays` unchanged when none did)."""
    replies = []
    for client, ids in sorted(forget.items()):
        if not len(ids):
            continue
        config = ConfigRecord(
            {
                SERVER_ROUND: server_round,
                IDS: np.asarray(ids, dtype="<i8").tobytes(),
                LR: lr,
                EPOCHS: epochs,
                BOUND: bound,
            }
        )
        content = RecordDict({ARRAYS: arrays, ASCENT_CONFIG: config})
        replies += query_nodes(
            grid, [node_id_of(client)], ASCENT_QUERY, content, label="unlearning ascent"
        )
    if not replies:
        return arrays, 0
    weights = np.array([float(r.content[METRICS][NUM_EXAMPLES]) for r in replies])
    weights = weights / weights.sum()
    averaged = {}
    for name in arrays:
        stack = [r.content[ARRAYS][name].numpy().astype(np.float64) for r in replies]
        mean = sum(w * s for w, s in zip(weights, stack, strict=True))
        averaged[name] = mean.astype(arrays[name].numpy().dtype)
    return to_array_record(averaged), len(replies)
