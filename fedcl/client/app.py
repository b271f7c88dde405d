"""fedcl's default Flower ClientApp: continual local training on the client's current task.

`train` trains the received global model on what this client holds in the round (its current task,
deletions removed, under its current concept, plus its replay buffer if enabled) and replies with
the new weights and `num-examples`, as Flower's FedAvg family expects (FedProx's `proximal-mu` is
honoured). It also replies with the ids of the samples it trained on (`AUDIT_KEY`), which the
engine records and strips before the strategy sees the reply. The node's `Context.state` keeps
per-client state across rounds; it lives on the actor the node is pinned to.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from fedcl.client import replay
from fedcl.client.runtime import current_runtime
from fedcl.client.training import accuracy, train_local
from fedcl.seeding import derive_seed

app = ClientApp()

STATE_KEY = "fedcl"  # the ConfigRecord in Context.state that holds fedcl's per-client bookkeeping
AUDIT_KEY = "fedcl.audit"  # ConfigRecord in train replies: "sample-ids", int64 bytes

# A train extra adds records to the train reply when the strategy's config carries its key, e.g. a
# Fisher-merging strategy sends "fisher-mode" and gets a "fisher" ArrayRecord back. It is called
# with the locally trained model, the client's training data of the round, the config and context.
TrainExtra = Callable[
    [nn.Module, np.ndarray, np.ndarray, ConfigRecord, Context],
    dict[str, ArrayRecord | MetricRecord | ConfigRecord],
]
_train_extras: dict[str, TrainExtra] = {}


def register_train_extra(config_key: str, extra: TrainExtra) -> None:
    """Have `train` call `extra` whenever a train message's config holds `config_key`."""
    _train_extras[config_key] = extra


def single_record(records: dict, kind: str) -> object:
    """The one record of a kind in a message (strategies choose the key names, not the client)."""
    if len(records) != 1:
        raise ValueError(f"expected exactly one {kind} in the message, got {sorted(records)}")
    return next(iter(records.values()))


def bump_train_count(context: Context) -> int:
    """Count, in the node's persistent state, how many times this client has trained; return it."""
    if STATE_KEY not in context.state:
        context.state[STATE_KEY] = ConfigRecord({"train-count": 0})
    record = context.state[STATE_KEY]
    record["train-count"] = int(record["train-count"]) + 1
    return int(record["train-count"])


def received(msg: Message, context: Context) -> tuple[nn.Module, ConfigRecord, int, int]:
    """The global model a message carries (loaded into a fresh network), its config record, this
    client's id and the server round."""
    arrays = single_record(msg.content.array_records, "ArrayRecord")
    config = single_record(msg.content.config_records, "ConfigRecord")
    model = current_runtime().new_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    client = int(context.node_config["partition-id"])
    return model, config, client, int(config["server-round"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this client's current task; reply with the new weights."""
    runtime = current_runtime()
    model, config, client, server_round = received(msg, context)
    scenario = runtime.scenario
    task = scenario.task_of(client, server_round)
    train_cfg = runtime.config["train"]
    extra_ids, extra_tasks = None, None
    if train_cfg["replay_size"] > 0:
        extra_ids, extra_tasks = replay.replay_samples(context)
        purged = replay.purge(context, scenario.deleted(extra_ids, server_round))
        if purged:
            extra_ids, extra_tasks = replay.replay_samples(context)
    view = runtime.client_view(client, server_round, extra_ids, extra_tasks)
    x, y = view.x, view.y
    stats = train_local(
        model,
        x,
        y,
        epochs=train_cfg["epochs"],
        batch_size=train_cfg["batch_size"],
        lr=train_cfg["lr"],
        momentum=train_cfg["momentum"],
        weight_decay=train_cfg["weight_decay"],
        max_steps=train_cfg["max_steps"],
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        class_mask=scenario.class_mask(view.tasks, runtime.num_classes),
        seed=derive_seed(runtime.seed, "train", client, server_round, task),
        device=runtime.device,
    )
    if train_cfg["replay_size"] > 0:
        current = view.ids[view.tasks == task]
        rng = np.random.default_rng(derive_seed(runtime.seed, "replay", client, task))
        replay.offer(context, current, task, train_cfg["replay_size"], rng)
    metrics = MetricRecord(
        {
            "num-examples": len(y),
            "train-loss": stats.loss,
            "train-steps": stats.steps,
            "train-count": bump_train_count(context),
            "task": task,
        }
    )
    used = view.ids[stats.rows_used].astype("<i8")
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": metrics,
            AUDIT_KEY: ConfigRecord({"sample-ids": used.tobytes()}),
        }
    )
    for key, extra in _train_extras.items():
        if key in config:
            for name, record in extra(model, x, y, config, context).items():
                content[name] = record
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this client's training data of its current task."""
    runtime = current_runtime()
    model, _, client, server_round = received(msg, context)
    view = runtime.client_view(client, server_round)
    mask = runtime.scenario.class_mask(view.tasks, runtime.num_classes)
    score = accuracy(model, view.x, view.y, class_mask=mask)
    metrics = MetricRecord({"num-examples": len(view.y), "accuracy": score})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


# Registers the continual-learning handlers (queries, train extras) on `app`; imported last because
# that module builds on the names defined above.
import fedcl.client.continual  # noqa: E402, F401
