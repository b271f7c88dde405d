"""Client-side handlers fedcl's continual strategies ask for (registered on the default app).

* ``query.fot_activations`` (FOT, `fedcl.strategies.fot`): the client's layer-input activations on
  its task data, with the old subspace removed and randomly projected by a private matrix, per
  protected layer; plus the residual ratio and the sample count.
* ``query.prototypes`` (prototype averaging, `fedcl.strategies.prototypes`): per-class sums and
  counts of the received model's embeddings of the client's task data.
* ``query.fisher`` (continual Fisher merging, `fedcl.strategies.fisher`): the received model's
  diagonal Fisher on the client's task data.
* the train extra ``fisher-mode``: the locally trained model's diagonal Fisher, added to the train
  reply as a ``"fisher"`` ArrayRecord.

Every query message carries one model ArrayRecord and one ConfigRecord with ``server-round`` (and
optionally ``task``: which of the client's tasks to read, default its task of that round). Every
random draw derives from (seed, purpose, client, round or task) only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedcl.client.app import app, register_train_extra, single_record
from fedcl.client.runtime import ClientRuntime, current_runtime
from fedcl.seeding import derive_rng, derive_seed
from fedcl.strategies.fisher import FISHER_KEY
from fedcl.strategies.fisher_math import diagonal_fisher
from fedcl.strategies.fot import BASES_KEY, SKETCHES_KEY
from fedcl.strategies.fot import RATIO_PREFIX as FOT_RATIO_PREFIX
from fedcl.strategies.fot_math import activation_sketch, layer_inputs, random_projection
from fedcl.strategies.prototype_math import PrototypeBank
from fedcl.strategies.prototypes import BANK_KEY

# Record names of the protocol are the strategies' own, so the two sides cannot drift apart.
FOT_BASES, FOT_SKETCHES, RATIO_PREFIX = BASES_KEY, SKETCHES_KEY, FOT_RATIO_PREFIX
PROTOTYPE_BANK = BANK_KEY
FISHER = FISHER_KEY
METRICS = "metrics"

ACTIVATION_BATCH = 256  # examples per forward pass when collecting activations or embeddings


def _model_record(content: RecordDict) -> ArrayRecord:
    """The model's ArrayRecord: the one array record that is not the FOT bases."""
    models = {k: v for k, v in content.array_records.items() if k != FOT_BASES}
    return single_record(models, "model ArrayRecord")  # type: ignore[return-value]


def task_data(
    runtime: ClientRuntime, client: int, server_round: int, task: int
) -> tuple[np.ndarray, np.ndarray]:
    """Client `client`'s training data of `task` as it holds it in `server_round`: samples
    deleted by then removed, the task's domain transform and the client's drifts applied. Only
    that task's samples (no replay, no blurry mix-in of the previous task)."""
    if task < 0:
        return runtime.x_train[:0], runtime.y_train[:0]
    view = runtime.task_view(client, server_round, task)
    return view.x, view.y


def _query_setup(
    msg: Message, context: Context
) -> tuple[ClientRuntime, ConfigRecord, torch.nn.Module, int, int, np.ndarray, np.ndarray]:
    """Runtime, config, the received model (eval mode), the client id, the task the query is
    about (config "task", default the client's task of "server-round") and its data of it."""
    runtime = current_runtime()
    config = single_record(msg.content.config_records, "ConfigRecord")
    client = int(context.node_config["partition-id"])
    server_round = int(config["server-round"])
    if "task" in config:
        task = int(config["task"])  # type: ignore[arg-type]
    else:
        task = runtime.scenario.task_of(client, server_round)
    model = runtime.new_model()
    model.load_state_dict(_model_record(msg.content).to_torch_state_dict())
    model.eval()
    x, y = task_data(runtime, client, server_round, task)
    return runtime, config, model, client, task, x, y  # type: ignore[return-value]


def _arrays(tensors: dict[str, Any]) -> ArrayRecord:
    """An ArrayRecord of numpy copies of `tensors` (torch tensors or numpy arrays)."""
    return ArrayRecord(
        {
            name: Array(np.ascontiguousarray(t.detach().cpu().numpy() if torch.is_tensor(t) else t))
            for name, t in tensors.items()
        }
    )


@app.query("fot_activations")
def fot_activations(msg: Message, context: Context) -> Message:
    """FOT's client side of Global Principal Subspace Extraction, for every layer asked for.

    For layer l with representation matrix A (d × n) over all of the client's task data (through
    the received global model), R = A − U Uᵀ A with the server's basis U, and a private random Q
    (n × m, m = sketch-factor · d, entries per `projection`): reply with R Q, ‖R‖_F / ‖A‖_F and n.
    The columns are processed in batches; R Q = Σ_b R_b Q_b with Q's row blocks Q_b.
    """
    runtime, config, model, client, task, x, _ = _query_setup(msg, context)
    layers = [str(name) for name in config["layers"]]
    kind, factor = str(config["projection"]), int(config["sketch-factor"])
    bases_record = msg.content.array_records.get(FOT_BASES, ArrayRecord())
    bases = {name: torch.from_numpy(bases_record[name].numpy()) for name in bases_record}
    inputs = torch.from_numpy(np.ascontiguousarray(x))

    sketches: dict[str, torch.Tensor] = {}
    norms_a = dict.fromkeys(layers, 0.0)
    norms_r = dict.fromkeys(layers, 0.0)
    generators = {
        name: torch.Generator().manual_seed(derive_seed(runtime.seed, "fot", client, task, i))
        for i, name in enumerate(layers)
    }
    for batch in inputs.split(ACTIVATION_BATCH):
        activations = layer_inputs(model, batch, layers)
        for name in layers:
            a = activations[name]
            m = factor * a.shape[0]
            q = random_projection(a.shape[1], m, generators[name], kind)
            sketch, ratio = activation_sketch(a, bases.get(name), q)
            sketches[name] = sketch if name not in sketches else sketches[name] + sketch
            norm_a = float(torch.linalg.norm(a)) ** 2
            norms_a[name] += norm_a
            norms_r[name] += ratio**2 * norm_a
    metrics = MetricRecord({"num-examples": len(x), "task": task})
    for name in sketches:  # no data, no sketches: the reply's zero count tells the server
        if name in bases and norms_a[name] > 0:
            metrics[RATIO_PREFIX + name] = float(np.sqrt(norms_r[name] / norms_a[name]))
        else:  # no basis yet (ratio 1), or no activation energy at all (nothing left to cover)
            metrics[RATIO_PREFIX + name] = 1.0 if name not in bases else 0.0
    content = RecordDict({FOT_SKETCHES: _arrays(sketches), METRICS: metrics})
    return Message(content, reply_to=msg)


@torch.no_grad()
def _embed(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's penultimate representation (`model.embed`) of `x`, as float64 (n, dim)."""
    if not hasattr(model, "embed"):
        raise TypeError(f"{type(model).__name__} has no embed(x); prototypes need one")
    inputs = torch.from_numpy(np.ascontiguousarray(x))
    parts = [model.embed(batch).reshape(len(batch), -1) for batch in inputs.split(ACTIVATION_BATCH)]
    return torch.cat(parts).double().numpy() if parts else np.zeros((0, 0))


@app.query("prototypes")
def prototypes(msg: Message, context: Context) -> Message:
    """Federated Reconnaissance's client step: per-class embedding sums and counts of the
    client's data of the task, through the received (frozen) model's `embed`."""
    runtime, _, model, _, task, x, y = _query_setup(msg, context)
    embeddings = _embed(model, x)
    if len(y) == 0:
        dim = int(model.head.in_features) if hasattr(model, "head") else 0
        embeddings = np.zeros((0, dim))
    bank = PrototypeBank.from_embeddings(embeddings, y, runtime.num_classes)
    content = RecordDict(
        {
            PROTOTYPE_BANK: _arrays({"sums": bank.sums, "counts": bank.counts}),
            METRICS: MetricRecord({"num-examples": len(y), "task": task}),
        }
    )
    return Message(content, reply_to=msg)


def _fisher(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: ConfigRecord,
    runtime: ClientRuntime,
    keys: tuple[int | str, ...],
) -> dict[str, torch.Tensor]:
    """`diagonal_fisher` with the config's mode, example count and batch size; the examples (a
    random subset when there are more) and sampled labels derive from (seed, "fisher", *keys)."""
    mode = str(config.get("fisher-mode", "expected"))
    limit = int(config.get("fisher-examples", len(x)))
    batch_size = int(config.get("fisher-batch-size", 64))
    if len(x) > limit:
        chosen = np.sort(
            derive_rng(runtime.seed, "fisher", *keys).choice(len(x), limit, replace=False)
        )
        x, y = x[chosen], y[chosen]
    generator = torch.Generator().manual_seed(derive_seed(runtime.seed, "fisher-labels", *keys))
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
    client = int(context.node_config["partition-id"])
    server_round = int(config["server-round"])
    task = runtime.scenario.task_of(client, server_round)
    if len(y) == 0:
        return {}
    fisher = _fisher(model, x, y, config, runtime, (client, server_round, task))
    return {FISHER: _arrays(fisher)}


register_train_extra("fisher-mode", fisher_train_extra)


@app.query("fisher")
def fisher(msg: Message, context: Context) -> Message:
    """The received model's diagonal Fisher on the client's data of the task (the continual
    Fisher variant asks for it at task ends), with the sample count."""
    runtime, config, model, client, task, x, y = _query_setup(msg, context)
    content = RecordDict({METRICS: MetricRecord({"num-examples": len(y), "task": task})})
    if len(y):
        keys = (client, int(config["server-round"]), task, "query")
        content[FISHER] = _arrays(_fisher(model, x, y, config, runtime, keys))
    return Message(content, reply_to=msg)
