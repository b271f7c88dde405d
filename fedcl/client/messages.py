"""Reading fedcl's messages on the client: the model a message carries, its config, the query's
task and data. What a client half (`ClientExtension`) of a strategy builds its handlers from."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from torch import nn

from fedcl.client.runtime import ClientRuntime, current_runtime
from fedcl.npy import array_of, array_record_of
from fedcl.protocol import PARTITION_ID, SERVER_ROUND, TASK


def single_record(records: Mapping[str, Any], kind: str) -> Any:
    """The one record of a kind in a message (strategies choose the key names, not the client)."""
    if len(records) != 1:
        raise ValueError(f"expected exactly one {kind} in the message, got {sorted(records)}")
    return next(iter(records.values()))


def client_of(context: Context) -> int:
    """The virtual client (partition id) a node's context belongs to."""
    return int(context.node_config[PARTITION_ID])


def model_record(msg: Message, exclude: Collection[str] = ()) -> ArrayRecord:
    """The message's model: its one ArrayRecord whose name is not in `exclude`."""
    models = {k: v for k, v in msg.content.array_records.items() if k not in exclude}
    return single_record(models, "model ArrayRecord")


def to_array_record(tensors: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord of numpy copies of `tensors` (torch tensors or numpy arrays), in Flower's
    .npy format."""
    return array_record_of(
        {
            name: array_of(t.detach().cpu().numpy() if torch.is_tensor(t) else np.asarray(t))
            for name, t in tensors.items()
        }
    )


@dataclass(frozen=True)
class QueryInput:
    """What a query handler reads: the received model (eval mode), config, client, round, the task
    the query is about and the client's data of that task as it holds it in that round."""

    runtime: ClientRuntime
    config: ConfigRecord
    model: nn.Module
    client: int
    server_round: int
    task: int
    x: np.ndarray
    y: np.ndarray


def read_query(msg: Message, context: Context, exclude: Collection[str] = ()) -> QueryInput:
    """Unpack a query: config ``task`` names the task (default: the client's task of the config's
    ``server-round``); the model is the one ArrayRecord not named in `exclude`."""
    runtime = current_runtime()
    config = single_record(msg.content.config_records, "ConfigRecord")
    client = client_of(context)
    server_round = int(config[SERVER_ROUND])
    explicit = TASK in config
    task = int(config[TASK]) if explicit else runtime.scenario.task_of(client, server_round)
    model = runtime.load_model(model_record(msg, exclude))
    model.eval()
    x, y = runtime.task_data(client, server_round, task)
    return QueryInput(runtime, config, model, client, server_round, task, x, y)
