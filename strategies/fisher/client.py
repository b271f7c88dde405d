"""Fisher merging's client half: the train extra ``fisher-mode`` (the locally trained model's
diagonal Fisher in the train reply) and ``query.fisher`` (the received model's Fisher).

The examples (a random subset when there are more than asked for) and the sampled labels derive
from (seed, purpose, client, round, task) only.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcl.client import client_of, current_runtime, read_query, to_array_record
from fedcl.protocol import METRICS, NUM_EXAMPLES, SERVER_ROUND, TASK
from fedcl.seeding import derive_rng, derive_seed
from fedcl.strategies.base import ClientExtension
from fedcl.strategies.fisher.keys import (
    FISHER_BATCH_SIZE,
    FISHER_EXAMPLES,
    FISHER_KEY,
    FISHER_MODE,
    FISHER_QUERY,
)
from fedcl.strategies.fisher.math import diagonal_fisher


def estimate_fisher(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: ConfigRecord,
    seed: int,
    keys: tuple[int | str, ...],
) -> dict[str, torch.Tensor]:
    """`diagonal_fisher` with the config's mode, example count and batch size; the examples and
    sampled labels derive from (seed, "fisher", *keys)."""
    mode = str(config.get(FISHER_MODE, "expected"))
    limit = int(config.get(FISHER_EXAMPLES, len(x)))
    batch_size = int(config.get(FISHER_BATCH_SIZE, 64))
    if len(x) > limit:
        chosen = np.sort(derive_rng(seed, "fisher", *keys).choice(len(x), limit, replace=False))
        x, y = x[chosen], y[chosen]
    generator = torch.Generator().manual_seed(derive_seed(seed, "fisher-labels", *keys))
    return diagonal_fisher(
        model,
        torch.from_numpy(np.ascontiguousarray(x)),
        torch.from_numpy(y),
        mode=mode,
        generator=generator,
        batch_size=batch_size,
    )


def fisher_train_extra(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: ConfigRecord,
    context: Context,
) -> dict[str, ArrayRecord]:
    """Train extra for Fisher merging: the locally trained model's diagonal Fisher on the data it
    was trained on (every parameter; the server merges buffers, if any, by plain averaging)."""
    runtime = current_runtime()
    client = client_of(context)
    server_round = int(config[SERVER_ROUND])
    task = runtime.scenario.task_of(client, server_round)
    if len(y) == 0:
        return {}
    fisher = estimate_fisher(model, x, y, config, runtime.seed, (client, server_round, task))
    return {FISHER_KEY: to_array_record(fisher)}


def fisher_query(msg: Message, context: Context) -> Message:
    """The received model's diagonal Fisher on the client's data of the task (the continual
    Fisher variant asks for it at task ends), with the sample count."""
    query = read_query(msg, context)
    metrics = MetricRecord({NUM_EXAMPLES: len(query.y), TASK: query.task})
    content = RecordDict({METRICS: metrics})
    if len(query.y):
        keys = (query.client, query.server_round, query.task, "query")
        fisher = estimate_fisher(
            query.model, query.x, query.y, query.config, query.runtime.seed, keys
        )
        content[FISHER_KEY] = to_array_record(fisher)
    return Message(content, reply_to=msg)


FISHER_CLIENT = ClientExtension(
    handlers={FISHER_QUERY: fisher_query}, train_extras={FISHER_MODE: fisher_train_extra}
)
