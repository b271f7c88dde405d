"""Prototype averaging's client half: per-class embedding sums and counts (``query.prototypes``)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedcl.client import read_query, to_array_record
from fedcl.protocol import METRICS, NUM_EXAMPLES, TASK
from fedcl.strategies.base import ClientExtension
from fedcl.strategies.prototypes.keys import BANK_KEY, PROTOTYPES_QUERY
from fedcl.strategies.prototypes.math import PrototypeBank

EMBED_BATCH = 256  # examples per forward pass when computing embeddings


@torch.no_grad()
def embed(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's penultimate representation (`model.embed`) of `x`, as float64 (n, dim)."""
    if not hasattr(model, "embed"):
        raise TypeError(f"{type(model).__name__} has no embed(x); prototypes need one")
    inputs = torch.from_numpy(np.ascontiguousarray(x))
    parts = [model.embed(batch).reshape(len(batch), -1) for batch in inputs.split(EMBED_BATCH)]
    return torch.cat(parts).double().numpy() if parts else np.zeros((0, 0))


def prototypes(msg: Message, context: Context) -> Message:
    """Federated Reconnaissance's client step: per-class embedding sums and counts of the
    client's data of the task, through the received (frozen) model's `embed`."""
    query = read_query(msg, context)
    if len(query.y):
        embeddings = embed(query.model, query.x)
    else:  # a client holding no data (all deleted) sends zero counts
        model = query.model
        dim = int(model.head.in_features) if hasattr(model, "head") else 0
        embeddings = np.zeros((0, dim))
    bank = PrototypeBank.from_embeddings(embeddings, query.y, query.runtime.num_classes)
    content = RecordDict(
        {
            BANK_KEY: to_array_record({"sums": bank.sums, "counts": bank.counts}),
            METRICS: MetricRecord({NUM_EXAMPLES: len(query.y), TASK: query.task}),
        }
    )
    return Message(content, reply_to=msg)


PROTOTYPES_CLIENT = ClientExtension(handlers={PROTOTYPES_QUERY: prototypes})
