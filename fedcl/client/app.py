"""fedcl's default Flower ClientApp: continual local training on the client's current task.

`train` trains the received global model on what this client holds in the round (its current task,
deletions removed, under its current concept, plus its replay buffer if enabled) and replies with
the new weights and `num-examples`, as Flower's FedAvg family expects (FedProx's `proximal-mu` is
honoured). It also replies with the ids of the samples it trained on (`AUDIT_KEY`), which the
engine records and strips before the strategy sees the reply. The strategy's train extras (from
its `ClientExtension`) add their records after training. The node's `Context.state` keeps
per-client state across rounds; it lives on the actor the node is pinned to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from torch import nn

from fedcl.client import replay
from fedcl.client.messages import client_of, single_record, to_array_record
from fedcl.client.runtime import ClientRuntime, current_runtime
from fedcl.client.training import TrainStats, accuracy, train_local
from fedcl.client.vectorized import (
    ClientBatchData,
    StackedResult,
    stacked_state,
    train_clients_stacked,
)
from fedcl.protocol import (
    ARRAYS,
    AUDIT_KEY,
    AUDIT_SAMPLE_IDS,
    METRICS,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    SERVER_ROUND,
    STATE_KEY,
    TASK,
)
from fedcl.scenario.scenario import ClientView
from fedcl.seeding import derive_seed

app = ClientApp()
# The keys of `Context.state` the default ClientApp writes; `rebuild_state` recreates them all.
REBUILT_KEYS = (STATE_KEY, replay.BUFFER_KEY, replay.STATS_KEY)


def bump_train_count(context: Context) -> int:
    """Count, in the node's persistent state, how many times this client has trained; return it."""
    if STATE_KEY not in context.state:
        context.state[STATE_KEY] = ConfigRecord({"train-count": 0})
    record = context.state[STATE_KEY]
    record["train-count"] = int(record["train-count"]) + 1
    return int(record["train-count"])


def received(msg: Message, context: Context) -> tuple[nn.Module, ConfigRecord, int, int]:
    """The global model a message carries (loaded into the actor's network), its config record,
    this client's id and the server round."""
    arrays = single_record(msg.content.array_records, "ArrayRecord")
    config = single_record(msg.content.config_records, "ConfigRecord")
    model = current_runtime().load_model(arrays)
    return model, config, client_of(context), int(config[SERVER_ROUND])


@dataclass(frozen=True)
class TrainJob:
    """What one client trains on in one round, as `train` and `train_vectorized` both prepare it."""

    config: ConfigRecord
    client: int
    server_round: int
    task: int
    view: ClientView
    class_mask: np.ndarray | None
    seed: int
    proximal_mu: float


def prepare(msg: Message, context: Context) -> TrainJob:
    """The client's data of the round (current task, deletions removed, its concept, plus its
    replay buffer purged of deleted samples) and the seeds and settings of its training."""
    config = single_record(msg.content.config_records, "ConfigRecord")
    return _job(context, config, int(config[SERVER_ROUND]))


def _job(context: Context, config: ConfigRecord, server_round: int) -> TrainJob:
    """`prepare` for a round given by number (`rebuild_state` has no message)."""
    runtime = current_runtime()
    client = client_of(context)
    scenario = runtime.scenario
    task = scenario.task_of(client, server_round)
    extra_ids, extra_tasks = None, None
    if runtime.config["train"]["replay_size"] > 0:
        extra_ids, extra_tasks = replay.replay_samples(context)
        purged = replay.purge(context, scenario.deleted(extra_ids, server_round))
        if purged:
            extra_ids, extra_tasks = replay.replay_samples(context)
    view = runtime.client_view(client, server_round, extra_ids, extra_tasks)
    return TrainJob(
        config=config,
        client=client,
        server_round=server_round,
        task=task,
        view=view,
        class_mask=scenario.class_mask(view.tasks, runtime.num_classes),
        seed=derive_seed(runtime.seed, "train", client, server_round, task),
        proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
    )


def reply(
    msg: Message,
    context: Context,
    job: TrainJob,
    model: nn.Module | None,
    stats: TrainStats,
    *,
    vectorized: bool = False,
) -> Message:
    """The train reply: the trained weights, metrics (``train-vectorized``: 1 when trained with
    other clients in one batch), audit ids and the strategy's train extras; also offers the
    round's samples to the client's replay buffer. With `model` None, the reply carries neither
    weights nor extras (the caller keeps the weights, see `StackedArrays`)."""
    runtime = current_runtime()
    view = job.view
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(view.y),
            "train-loss": stats.loss,
            "train-steps": stats.steps,
            "train-count": record_training(context, job),
            TASK: job.task,
            "train-vectorized": int(vectorized),
        }
    )
    used = view.ids[stats.rows_used].astype("<i8")
    content = RecordDict(
        {METRICS: metrics, AUDIT_KEY: ConfigRecord({AUDIT_SAMPLE_IDS: used.tobytes()})}
    )
    if model is None:
        return Message(content, reply_to=msg)
    content[ARRAYS] = to_array_record(model.state_dict())
    for key, extra in runtime.train_extras.items():
        if key in job.config:
            for name, record in extra(model, view.x, view.y, job.config, context).items():
                content[name] = record
    return Message(content, reply_to=msg)


def record_training(context: Context, job: TrainJob) -> int:
    """What training in `job`'s round leaves in the node's state: the round's samples of the
    current task offered to the replay buffer, the train count bumped; return the new count."""
    runtime = current_runtime()
    capacity = runtime.config["train"]["replay_size"]
    if capacity > 0:
        current = job.view.ids[job.view.tasks == job.task]
        rng = np.random.default_rng(derive_seed(runtime.seed, "replay", job.client, job.task))
        replay.offer(context, current, job.task, capacity, rng)
    return bump_train_count(context)


def rebuild_state(context: Context, rounds: Iterable[int]) -> None:
    """Bring the node's state (`REBUILT_KEYS`) from what it was before `rounds` (ascending) to
    what training in each of them left, without training: the state is a function of the rounds
    a client trained in (`prepare`'s replay purge, then `record_training`), so the result equals
    the state of a client that trained. Used for clients whose actor died."""
    for server_round in rounds:
        record_training(context, _job(context, ConfigRecord(), server_round))


def sgd_settings(runtime: ClientRuntime) -> dict[str, Any]:
    """The run's local SGD settings (``train.*``), as both training paths take them."""
    keys = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "max_steps")
    return {key: runtime.config["train"][key] for key in keys}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model on this client's current task; reply with the new weights."""
    runtime = current_runtime()
    job = prepare(msg, context)
    model = runtime.load_model(single_record(msg.content.array_records, "ArrayRecord"))
    stats = train_job(model, job)
    return reply(msg, context, job, model, stats)


def train_job(model: nn.Module, job: TrainJob) -> TrainStats:
    """Train `model` (holding the global weights) in place on `job` with the run's SGD settings:
    the one training step of `train` and of `train_many`'s one-by-one path."""
    runtime = current_runtime()
    return train_local(
        model,
        job.view.x,
        job.view.y,
        **sgd_settings(runtime),
        proximal_mu=job.proximal_mu,
        class_mask=job.class_mask,
        seed=job.seed,
        device=runtime.device,
    )


@dataclass(frozen=True)
class StackedArrays:
    """The trained model arrays of several train replies, kept stacked instead of in the replies.

    Attributes
    ----------
    positions : list[int]
        The replies (indices into the messages given to `train_many`) whose arrays these are, in
        row order; those replies carry no ``arrays`` record.
    arrays : dict[str, np.ndarray]
        Per array name of the model record, in its order: a (len(positions), *shape) array, row i
        for the reply at ``positions[i]``.
    """

    positions: list[int]
    arrays: dict[str, np.ndarray]


def train_many(
    messages: Sequence[Message],
    contexts: Sequence[Context],
    *,
    vectorize: bool,
    stacked: list[StackedArrays] | None = None,
    on_failure: Callable[[Exception], None] | None = None,
) -> list[Message | None]:
    """`train` for all of one actor's train messages of a round at once.

    With `vectorize` (``engine.vectorize``), the clients that received the same model and FedProx
    μ train together (`train_clients_stacked`); each reply equals `train`'s to
    float32 rounding. Without, each client trains alone with `train_local`, bit for bit as in
    `train`; that pays only with `stacked`, so without it every client is left to the ClientApp.

    Given a `stacked` list, the trained arrays of replies that carry nothing else built from the
    model (no strategy train extras) are appended to it as `StackedArrays` instead of being put
    into their replies: for a caller that sums them (`fedcl.engine.summation.sum_replies`).

    A client whose preparation or training fails gets None: run it through the ClientApp, which
    reports its failure as for any client. When vectorized training of a group fails as a whole
    (a model it cannot run), `on_failure` gets the exception and the group's clients get None;
    nothing of theirs was recorded yet (replay buffer, train count), so the ClientApp trains
    them as if this had not been tried.
    """
    runtime = current_runtime()
    replies: dict[int, Message | None] = dict.fromkeys(range(len(messages)))
    groups: dict[tuple, list[tuple[int, TrainJob]]] = {}
    for i, (msg, context) in enumerate(zip(messages, contexts, strict=True)):
        try:
            job = prepare(msg, context)
        except Exception:  # this client's failure only; `train` will raise it again, reported
            continue
        arrays = single_record(msg.content.array_records, "ArrayRecord")
        key = (tuple(id(a) for a in arrays.values()), job.proximal_mu)
        groups.setdefault(key, []).append((i, job))
    for members in groups.values():
        keep = stacked is not None and not any(
            key in job.config for key in runtime.train_extras for _, job in members
        )
        if vectorize:
            try:
                trained = _train_group(messages, members)
            except Exception as exc:  # e.g. a model vmap cannot run; the ClientApp still can
                if on_failure is not None:
                    on_failure(exc)
                continue
            _reply_vectorized(messages, contexts, members, trained, keep, stacked, replies)
        elif keep:
            _train_each(messages, contexts, members, stacked, replies)
    return [replies[i] for i in range(len(messages))]


def _train_group(
    messages: Sequence[Message], members: list[tuple[int, TrainJob]]
) -> tuple[nn.Module, StackedResult]:
    """Train `members` (one model, one μ) together: the model holding the global weights, and
    the result. Changes no client's state."""
    runtime = current_runtime()
    first = messages[members[0][0]]
    model = runtime.load_model(single_record(first.content.array_records, "ArrayRecord"))
    data = [ClientBatchData(job.view.x, job.view.y, job.seed, job.class_mask) for _, job in members]
    trained = train_clients_stacked(
        model,
        data,
        **sgd_settings(runtime),
        proximal_mu=members[0][1].proximal_mu,
        device=runtime.device,
    )
    return model, trained


def _reply_vectorized(
    messages: Sequence[Message],
    contexts: Sequence[Context],
    members: list[tuple[int, TrainJob]],
    trained: tuple[nn.Module, StackedResult],
    keep: bool,
    stacked: list[StackedArrays] | None,
    replies: dict[int, Message | None],
) -> None:
    """The replies of `members` trained together (`_train_group`) go into `replies`, their
    arrays into `stacked` if `keep`."""
    model, result = trained
    state = stacked_state(model, result.params, len(members))
    if keep and stacked is not None:
        arrays = {name: values.detach().cpu().numpy() for name, values in state.items()}
        stacked.append(StackedArrays([i for i, _ in members], arrays))
    for row, ((i, job), stats) in enumerate(zip(members, result.stats, strict=True)):
        if keep:
            replies[i] = reply(messages[i], contexts[i], job, None, stats, vectorized=True)
        else:
            model.load_state_dict({name: values[row] for name, values in state.items()})
            replies[i] = reply(messages[i], contexts[i], job, model, stats, vectorized=True)


def _train_each(
    messages: Sequence[Message],
    contexts: Sequence[Context],
    members: list[tuple[int, TrainJob]],
    stacked: list[StackedArrays],
    replies: dict[int, Message | None],
) -> None:
    """Train `members` (one model, one μ) one by one as `train` does; their replies go into
    `replies`, their arrays into `stacked`."""
    runtime = current_runtime()
    arrays = single_record(messages[members[0][0]].content.array_records, "ArrayRecord")
    rows: dict[str, np.ndarray] = {}
    done: list[int] = []
    for i, job in members:
        try:
            model = runtime.load_model(arrays)
            stats = train_job(model, job)
        except Exception:  # this client's failure only; the ClientApp reports it
            continue
        for name, values in model.state_dict().items():
            if name not in rows:
                rows[name] = np.empty((len(members), *values.shape), values.numpy().dtype)
            rows[name][len(done)] = values.numpy()
        replies[i] = reply(messages[i], contexts[i], job, None, stats)
        done.append(i)
    if done:
        stacked.append(StackedArrays(done, {name: a[: len(done)] for name, a in rows.items()}))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this client's training data of its current task."""
    runtime = current_runtime()
    model, _, client, server_round = received(msg, context)
    view = runtime.client_view(client, server_round)
    mask = runtime.scenario.class_mask(view.tasks, runtime.num_classes)
    score = accuracy(model, view.x, view.y, class_mask=mask)
    metrics = MetricRecord({NUM_EXAMPLES: len(view.y), "accuracy": score})
    return Message(RecordDict({METRICS: metrics}), reply_to=msg)
