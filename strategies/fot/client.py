"""FOT's client half: the client step of Global Principal Subspace Extraction
(``query.fot_activations``).

Every random draw derives from (seed, "fot", client, task, layer) only.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedcl.client import read_query, to_array_record
from fedcl.protocol import METRICS, NUM_EXAMPLES, TASK
from fedcl.seeding import derive_seed
from fedcl.strategies.base import ClientExtension
from fedcl.strategies.fot.keys import (
    ACTIVATIONS_QUERY,
    BASES_KEY,
    LAYERS,
    PROJECTION,
    RATIO_PREFIX,
    SKETCH_FACTOR,
    SKETCHES_KEY,
)
from fedcl.strategies.fot.math import activation_sketch, layer_inputs, random_projection

ACTIVATION_BATCH = 256  # examples per forward pass when collecting activations


def fot_activations(msg: Message, context: Context) -> Message:
    """FOT's client side of Global Principal Subspace Extraction, for every layer asked for.

    For layer l with representation matrix A (d × n) over all of the client's task data (through
    the received global model), R = A − U Uᵀ A with the server's basis U, and a private random Q
    (n × m, m = sketch-factor · d, entries per `projection`): reply with R Q, ‖R‖_F / ‖A‖_F and n.
    The columns are processed in batches; R Q = Σ_b R_b Q_b with Q's row blocks Q_b.
    """
    query = read_query(msg, context, exclude=(BASES_KEY,))
    config = query.config
    layers = [str(name) for name in config[LAYERS]]
    kind, factor = str(config[PROJECTION]), int(config[SKETCH_FACTOR])
    bases_record = msg.content.array_records.get(BASES_KEY, ArrayRecord())
    bases = {name: torch.from_numpy(bases_record[name].numpy()) for name in bases_record}
    inputs = torch.from_numpy(np.ascontiguousarray(query.x))

    sketches: dict[str, torch.Tensor] = {}
    norms_a = dict.fromkeys(layers, 0.0)
    norms_r = dict.fromkeys(layers, 0.0)
    seed = query.runtime.seed
    generators = {
        name: torch.Generator().manual_seed(derive_seed(seed, "fot", query.client, query.task, i))
        for i, name in enumerate(layers)
    }
    for batch in inputs.split(ACTIVATION_BATCH):
        activations = layer_inputs(query.model, batch, layers)
        for name in layers:
            a = activations[name]
            m = factor * a.shape[0]
            q = random_projection(a.shape[1], m, generators[name], kind)
            sketch, ratio = activation_sketch(a, bases.get(name), q)
            sketches[name] = sketch if name not in sketches else sketches[name] + sketch
            norm_a = float(torch.linalg.norm(a)) ** 2
            norms_a[name] += norm_a
            norms_r[name] += ratio**2 * norm_a
    metrics = MetricRecord({NUM_EXAMPLES: len(query.x), TASK: query.task})
    for name in sketches:  # no data, no sketches: the reply's zero count tells the server
        if name in bases and norms_a[name] > 0:
            metrics[RATIO_PREFIX + name] = float(np.sqrt(norms_r[name] / norms_a[name]))
        else:  # no basis yet (ratio 1), or no activation energy at all (nothing left to cover)
            metrics[RATIO_PREFIX + name] = 1.0 if name not in bases else 0.0
    content = RecordDict({SKETCHES_KEY: to_array_record(sketches), METRICS: metrics})
    return Message(content, reply_to=msg)


FOT_CLIENT = ClientExtension(handlers={ACTIVATIONS_QUERY: fot_activations})
