"""The round loop: Flower strategy on a RayGrid, continual evaluation, observers.

for each round r:
    apply the timeline's events of r (hooks)          -> observers (events.jsonl)
    strategy.configure_train(r, arrays, config, grid) -> messages
    grid.send_and_receive(messages)                   -> replies (audited; screened: NaN, shapes)
    strategy.aggregate_train(r, replies)              -> new global arrays; task-end hooks
    evaluate on every task seen so far (+ the next)   -> observers (metrics.jsonl, bar, checkpoints)
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.clientapp import ClientApp
from omegaconf import DictConfig, OmegaConf
from threadpoolctl import threadpool_limits

from fedcl.config import plain_config, to_container, to_yaml
from fedcl.engine import strategy_calls
from fedcl.engine.actor import ActorFactory, kill_actors
from fedcl.engine.audit import DeletionAudit, pop_trained_ids
from fedcl.engine.checkpoint import ResumePoint, restore
from fedcl.engine.events import apply_events, end_task_hooks
from fedcl.engine.flower_compat import make_run, node_id_of, set_server_identity
from fedcl.engine.grid import RayGrid
from fedcl.engine.observers import (
    CheckpointObserver,
    ProgressObserver,
    RecorderObserver,
    RoundObserver,
)
from fedcl.engine.pool import init_ray, pool_size
from fedcl.engine.recovery import ActorRecovery
from fedcl.engine.replies import compiled_kernels, limits_per_node, screen_replies
from fedcl.engine.summation import is_stub, sum_plan
from fedcl.engine.vectorize import resolve_vectorize
from fedcl.errors import StrategyError
from fedcl.imports import import_modules, load_object
from fedcl.metrics.continual import continual_summary, stream_summary
from fedcl.metrics.evaluation import TaskEvaluator, mean
from fedcl.metrics.plots import plot_run
from fedcl.metrics.recorder import RunRecorder, check_out_dir
from fedcl.metrics.run_metrics import evaluation_rounds, run_summary
from fedcl.metrics.system import system_record
from fedcl.metrics.tensorboard import TensorBoardObserver, require_tensorboard
from fedcl.models import model_from_config
from fedcl.scenario.datasets import ArrayDataset, cache_folder, load_dataset
from fedcl.scenario.scenario import Scenario, build_scenario
from fedcl.seeding import derive_rng, derive_seed
from fedcl.strategies.base import ClientExtension, ContinualStrategy, ScenarioInfo
from fedcl.unlearning import (
    Unlearning,
    UnlearningError,
    check_unlearning,
    with_unlearning_handlers,
)
from fedcl.unlearning.replica import EngineParts
from fedcl.unlearning.sharded import ShardedStrategy, build_run_strategy, evaluation_model


@dataclass
class RunResult:
    """What a finished run leaves: folder, summary, per-round records, final global arrays, and
    the strategy object itself (with whatever state it kept, e.g. FOT bases)."""

    out_dir: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)
    arrays: ArrayRecord | None = None
    strategy: Any = None


def default_out_dir(cfg: DictConfig) -> Path:
    """runs/<name>-<YYYYmmdd-HHMMSS> under the working directory, always a folder directly in
    runs/: `name` loses every character but letters, digits, '_', '.' and '-' (runs of others
    become one '-'), dots and dashes at either end, and all past 64 characters; 'run' if nothing
    is left, or if `name` comes from the environment (`${oc.env:...}`), which is not written to
    disk."""
    from_env = OmegaConf.is_interpolation(cfg, "name")
    slug = "" if from_env else re.sub(r"[^\w.-]+", "-", str(cfg.name)).strip(".-")[:64]
    return Path("runs") / f"{slug or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_simulation(
    cfg: DictConfig,
    out_dir: str | Path | None = None,
    *,
    progress: bool | None = None,
    resume: ResumePoint | None = None,
) -> RunResult:
    """Run the experiment `cfg` (a validated config from `fedcl.config.load_config`); with
    `resume` (`fedcl.engine.checkpoint.prepare_resume`), continue the run in `out_dir` from it.

    Everything a user can get wrong (dataset, strategy, ClientApp, resources) is checked before the
    run folder is created; a `FedclError` then leaves nothing behind. The driver's own torch work
    (evaluation, the vectorize probe) runs on `engine.torch_threads` threads, as the actors do.
    """
    threads = torch.get_num_threads()
    # Intra-op threads contending with busy actor cores slow evaluation 10x on a small machine;
    # numpy's BLAS threads (screening, strategies' linear algebra) likewise.
    torch.set_num_threads(cfg.engine.torch_threads)
    try:
        with threadpool_limits(limits=cfg.engine.torch_threads):
            return _simulate(cfg, out_dir, progress=progress, resume=resume)
    finally:
        torch.set_num_threads(threads)


def _simulate(
    cfg: DictConfig,
    out_dir: str | Path | None = None,
    *,
    progress: bool | None = None,
    resume: ResumePoint | None = None,
) -> RunResult:
    started = time.perf_counter()
    # Everything a user can get wrong is checked before Ray starts, the run folder first.
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
    check_out_dir(out_dir, resuming=resume is not None)
    if cfg.log.tensorboard:
        require_tensorboard()
    if not cfg.log.verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    container = to_container(cfg)
    dataset = load_dataset(
        cfg.dataset.name,
        seed=cfg.seed,
        root=cfg.dataset.root,
        cache_dir=cfg.dataset.cache_dir,
        **container["dataset"]["options"],
    )
    scenario = build_scenario(cfg, dataset)

    def new_model():
        return model_from_config(container, dataset.input_shape, dataset.num_classes)

    def eval_model():  # what the driver predicts with: the model, or a sharded run's ensemble
        return evaluation_model(cfg, container, dataset.input_shape, dataset.num_classes)

    arrays = ArrayRecord(eval_model().state_dict())
    import_modules(cfg.imports)
    strategy = build_run_strategy(container, cfg)
    check_unlearning(cfg, strategy, resuming=resume is not None)
    extension = with_unlearning_handlers(strategy_calls.client_extension(strategy), cfg)
    load_object(cfg.client.app, what="client.app", expect=ClientApp)
    init_ray(cfg.engine.ray_address, verbose=cfg.log.verbose)
    num_actors = pool_size(
        cfg.engine.num_cpus_per_actor, cfg.engine.num_gpus_per_actor, cfg.engine.num_actors
    )

    clients_per_round = _clients_per_round(cfg, strategy)
    vectorize, vectorize_why = resolve_vectorize(
        cfg.engine.vectorize,
        model=new_model(),
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
        batch_size=cfg.train.batch_size,
        clients_per_round=clients_per_round,
        client_app=cfg.client.app,
        device="cuda" if cfg.engine.num_gpus_per_actor > 0 and torch.cuda.is_available() else "cpu",
        cache=cache_folder(cfg.dataset.cache_dir),
    )
    container["engine"]["vectorize"] = vectorize
    run_id = derive_seed(cfg.seed, "run")
    set_server_identity(run_id)
    call_elements = 0  # what one actor call sums: none, unless the actors sum the replies
    if cfg.engine.sum_on_actors and sum_plan(strategy) is not None:
        model_size = sum(math.prod(array.shape) for array in arrays.values())
        clients_per_actor = math.ceil(clients_per_round / num_actors)
        call_elements = model_size * (clients_per_actor if vectorize == "on" else 1)
        compiled_kernels(2 * model_size)  # the driver adds the actors' sums: two arrays each
    factory = actor_factory(container, dataset, scenario, run_id, extension, call_elements)
    actors = factory.start(num_actors)
    recorder, grid = None, None
    try:
        recorder = RunRecorder(out_dir, to_yaml(cfg), lock=resume.lock if resume else None)
        node_ids = node_id_of(np.arange(cfg.clients.num))
        recovery = ActorRecovery(
            factory,
            node_ids,
            max_retries=cfg.engine.max_retries,
            run_dir=recorder.out_dir,
            starts_after=resume.server_round if resume is not None else 0,
        )
        grid = RayGrid(
            actors, node_ids, make_run(run_id), recovery=recovery, balance=cfg.engine.balance
        )
        evaluator = TaskEvaluator(dataset, scenario, eval_model, cfg.eval.batch_size)
        observers: list[RoundObserver] = [
            RecorderObserver(recorder),
            ProgressObserver(cfg.rounds, cfg.log.progress if progress is None else progress),
        ]
        if cfg.checkpoint.every or cfg.checkpoint.every_s:
            observers.append(CheckpointObserver(recorder, grid, cfg.checkpoint, vectorize))
        if cfg.log.tensorboard:
            observers.append(TensorBoardObserver(recorder.out_dir))
        if isinstance(strategy, ContinualStrategy):
            info = scenario_info(cfg, scenario, dataset.num_classes)
            strategy_calls.notify(strategy, "on_run_start", 0, info)
        restored = restore(resume, strategy, grid) if resume is not None else None
        unlearning = None
        if cfg.unlearning.method != "none" or cfg.unlearning.oracle:
            parts = EngineParts(cfg, container, dataset, extension, run_id)
            unlearning = Unlearning(parts, scenario, recorder.out_dir, arrays)
        try:
            result = _round_loop(
                cfg,
                strategy,
                grid,
                arrays,
                scenario,
                evaluator,
                observers,
                recorder.out_dir,
                restored,
                unlearning,
            )
        except (StrategyError, UnlearningError) as exc:
            recorder.write_summary({"status": "failed", "error": str(exc)})
            raise
        result.summary.update(
            wall_s=time.perf_counter() - started,
            num_actors=num_actors,
            num_clients=cfg.clients.num,
            vectorized=vectorize == "on",
            vectorize_reason=vectorize_why,
            strategy=cfg.strategy.get("target") or cfg.strategy.get("name"),
        )
        recorder.write_summary(result.summary)
        plot_run(
            result.records,
            recorder.out_dir,
            scenario.num_tasks,
            title=cfg.name,
            matrix=scenario.is_sequential(),
        )
        return result
    finally:
        if recorder is not None:
            recorder.close()
        kill_actors(grid.actors if grid is not None else actors)  # with any replacements


def actor_factory(
    config: dict[str, Any],
    dataset: ArrayDataset,
    scenario: Scenario,
    run_id: int,
    extension: ClientExtension | None = None,
    call_elements: int = 0,
) -> ActorFactory:
    """What the run's client actors are started with: `config` (the resolved config as plain
    containers, `fedcl.config.to_container`), one object-store copy of the scenario and data,
    `extension`, the strategy's client half, and `call_elements`, about how many model elements
    one actor call sums (`ClientActor.ready`)."""
    return ActorFactory.create(
        config,
        scenario,
        dataset.x_train,
        dataset.y_train,
        dataset.input_shape,
        dataset.num_classes,
        run_id,
        extension,
        call_elements,
    )


def start_client_actors(
    config: dict[str, Any],
    dataset: ArrayDataset,
    scenario: Scenario,
    run_id: int,
    num_actors: int,
    extension: ClientExtension | None = None,
) -> list[ray.actor.ActorHandle]:
    """Start `num_actors` client actors sharing one object-store copy of the data; wait until
    ready (`ActorFactory.start`: a `FedclError` when they cannot be placed or fail to start)."""
    return actor_factory(config, dataset, scenario, run_id, extension).start(num_actors)


def _clients_per_round(cfg: DictConfig, strategy: Any) -> int:
    """About how many clients train per round (what auto's probe is sized for)."""
    online = cfg.clients.num * cfg.clients.participation
    fraction = getattr(strategy, "fraction_train", 1.0)
    return max(1, math.ceil(online * (fraction if isinstance(fraction, float | int) else 1.0)))


def scenario_info(cfg: DictConfig, scenario: Scenario, num_classes: int) -> ScenarioInfo:
    """What the strategy is told of the scenario before round 1."""
    return ScenarioInfo(
        num_clients=scenario.num_clients,
        num_tasks=scenario.num_tasks,
        num_classes=num_classes,
        rounds=cfg.rounds,
        kind=scenario.kind,
        task_classes=tuple(tuple(int(c) for c in t) for t in scenario.task_classes),
        seed=cfg.seed,
    )


def _online_clients(cfg: DictConfig, available: np.ndarray, server_round: int) -> np.ndarray:
    """The round's `available` clients (ascending), thinned to `clients.participation` (seeded).
    Array operations only: a million clients may be available."""
    share = cfg.clients.participation
    if share >= 1 or not len(available):
        return available
    count = max(1, round(share * len(available)))
    rng = derive_rng(cfg.seed, "participation", server_round)
    return np.sort(rng.choice(available, count, replace=False))


def _nodes_needed(strategy: Any) -> int:
    """How many online nodes the strategy waits for (stock Flower strategies sleep until then)."""
    needed = [getattr(strategy, a, 0) for a in ("min_available_nodes", "min_train_nodes")]
    return max([n for n in needed if isinstance(n, int)] + [1])


@dataclass
class TrainStep:
    """What one round's training did: the new arrays and what the clients answered.

    `problems` holds (node id, reason) for every sampled client whose update was not aggregated:
    its reply was an error, was refused by the screen, never came (timed out) or was dropped
    with its round (`screen.max_rejected`); `discarded` says why in the last case."""

    arrays: ArrayRecord
    sampled: int = 0
    succeeded: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    discarded: str | None = None
    summed: int = 0  # successful replies whose models were summed on their actors


def _train_step(cfg, strategy, grid, arrays, server_round, online, audit, scenario) -> TrainStep:
    """configure_train -> send_and_receive -> audit and screen replies -> aggregate_train."""
    settings = plain_config(cfg)  # read every round: plain dicts, not OmegaConf's slow reads
    engine = settings["engine"]
    needed = _nodes_needed(strategy)
    if len(online) < needed:
        return TrainStep(
            arrays, skipped=f"{len(online)} clients online, the strategy needs {needed}"
        )
    # Stock Flower strategies sample nodes with the global `random`; seeding it per round from
    # (seed, round) makes their sampling reproducible and independent of earlier rounds.
    random.seed(derive_seed(settings["seed"], "sample", server_round))
    messages = strategy_calls.configure_train(strategy, server_round, arrays, ConfigRecord(), grid)
    # Only fedcl's RayGrid has actors that can sum; any other Flower Grid gets every reply.
    can_sum = engine["sum_on_actors"] and isinstance(grid, RayGrid)
    plan = sum_plan(strategy, server_round) if can_sum else None
    if plan is None:  # Flower's own signature
        replies = list(grid.send_and_receive(messages, timeout=engine["timeout_s"]))
    else:
        replies = list(grid.send_and_receive(messages, timeout=engine["timeout_s"], plan=plan))
    unanswered = _unanswered(grid, messages, replies, engine["timeout_s"])
    audit.record(server_round, pop_trained_ids(replies))
    model_key = getattr(strategy, "arrayrecord_key", "arrays")
    weight_key = getattr(strategy, "weighted_by_key", None)
    screened = screen_replies(
        replies,
        arrays,
        model_key,
        limits_per_node(
            settings, scenario, server_round, weight_key if isinstance(weight_key, str) else None
        ),
        max_rejected=settings["screen"]["max_rejected"],
        screened_before=is_stub if plan is not None else None,
    )
    replies = screened.replies
    succeeded = sum(not reply.has_error() for reply in replies)
    summed = sum(is_stub(reply) for reply in replies)
    if plan is not None:
        sums = grid.take_sums()
        replies = strategy_calls.combine_sums(strategy, server_round, replies, sums, plan)
    new_arrays, metrics = strategy_calls.aggregate_train(strategy, server_round, replies)
    return TrainStep(
        arrays=new_arrays if new_arrays is not None else arrays,
        sampled=len(messages),
        succeeded=succeeded,
        problems=sorted(screened.problems + unanswered),
        metrics=dict(metrics) if isinstance(metrics, MetricRecord) else {},
        discarded=screened.discarded,
        summed=summed,
    )


def _unanswered(grid, messages, replies, timeout: float) -> list[tuple[int, str]]:
    """(node id, reason) for each message that got no reply: the grid dropped it at the timeout.
    A grid without `take_timed_out` drops replies only at the timeout, too."""
    take = getattr(grid, "take_timed_out", None)
    timed_out = set(take()) if take is not None else None
    answered = {reply.metadata.src_node_id for reply in replies}
    missing = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered]
    late = f"timed out after engine.timeout_s={timeout:g} s"
    return [(n, late if timed_out is None or n in timed_out else "no reply") for n in missing]


@dataclass
class PlayedRound:
    """What `train_round` did: the new global arrays, the training step, the clients."""

    arrays: ArrayRecord
    step: TrainStep
    online: np.ndarray
    available: np.ndarray
    train_s: float


def train_round(
    cfg,
    strategy,
    grid,
    arrays,
    scenario,
    server_round,
    audit,
    *,
    task_end_hooks: bool = True,
    members: np.ndarray | None = None,
) -> PlayedRound:
    """A round after its events: the online clients, training (audited), the task-end hooks
    (unless `task_end_hooks` is False). The main loop and `fedcl.unlearning`'s replays play
    rounds through this alone; a sharded run's strategy plays each shard's part through it
    (`ShardedStrategy.train_round`), with `members` (a mask over clients) keeping only the
    shard's clients of the round's online ones."""
    if isinstance(strategy, ShardedStrategy):
        return strategy.train_round(cfg, grid, arrays, scenario, server_round, audit)
    available = scenario.available_array(server_round)
    online = _online_clients(cfg, available, server_round)
    if members is not None:
        online = online[members[online]]
    grid.set_available(node_id_of(online))
    train_started = time.perf_counter()
    step = _train_step(cfg, strategy, grid, arrays, server_round, online, audit, scenario)
    train_s = time.perf_counter() - train_started
    arrays = step.arrays
    if task_end_hooks:
        arrays = end_task_hooks(scenario, server_round, strategy, arrays, grid)
    return PlayedRound(arrays, step, online, available, train_s)


def _round_loop(
    cfg,
    strategy,
    grid,
    arrays,
    scenario,
    evaluator,
    observers,
    out_dir: Path,
    restored=None,
    unlearning=None,
) -> RunResult:
    """The rounds, top to bottom (after `restored`'s round, for a resumed run); observers see
    every round's events and record."""
    audit = DeletionAudit(scenario, out_dir if cfg.log.trained_samples else None)
    if restored is None:
        init_acc, records, first = evaluator.evaluate(arrays, range(scenario.num_tasks)), [], 1
    else:
        arrays, init_acc, records = restored.arrays, restored.init_acc, list(restored.records)
        audit.load_state_dict(restored.audit)
        first = restored.server_round + 1
    updates = sum(record["replies"] for record in records)
    evaluated = evaluation_rounds(cfg.rounds, cfg.eval.every, scenario.task_end_rounds())
    for observer in observers:
        observer.on_loop_start(first, init_acc, audit)
    if unlearning is not None:
        unlearning.start(first, arrays, strategy, grid)
    loop_started = time.perf_counter()
    try:
        for server_round in range(first, cfg.rounds + 1):
            round_started = time.perf_counter()
            arrays, applied = apply_events(scenario, server_round, strategy, arrays, grid)
            for observer in observers:
                observer.on_events(server_round, applied)
            if unlearning is not None:  # a delete event's method runs before the round trains
                arrays = unlearning.after_events(server_round, arrays, strategy, grid, audit)
            played = train_round(cfg, strategy, grid, arrays, scenario, server_round, audit)
            arrays, step, train_s = played.arrays, played.step, played.train_s
            online, available = played.online, played.available
            updates += step.succeeded
            if server_round in evaluated:
                record = _evaluate_round(cfg, scenario, evaluator, arrays, server_round, available)
            else:  # eval.every: not evaluated this round
                record = {"round": server_round, "task": scenario.global_task(server_round)}
            if isinstance(grid, RayGrid):
                record.update(system_record(grid))
            record.update(
                online=len(online),
                sampled=step.sampled,
                replies=step.succeeded,
                summed_on_actors=step.summed,
                failures=[{"node": n, "reason": r} for n, r in step.problems],
                train=step.metrics,
                train_s=train_s,
                round_s=time.perf_counter() - round_started,
            )
            if step.skipped:
                record["skipped"] = step.skipped
            replacements = grid.take_replacements() if isinstance(grid, RayGrid) else []
            if replacements:
                record["actor_replacements"] = replacements
            if step.discarded:
                record["discarded"] = step.discarded
            if not step.succeeded:
                record["no_updates"] = True
            records.append(record)
            if unlearning is not None:
                unlearning.after_round(server_round, arrays, strategy, grid, audit)
            for observer in observers:
                observer.on_round_end(record, arrays, strategy)
    finally:
        for observer in observers:
            observer.close()
        if unlearning is not None:
            unlearning.close()
    loop_s = time.perf_counter() - loop_started
    if scenario.is_sequential():
        summary = continual_summary(records, scenario.num_tasks, init_acc)
    else:
        summary = stream_summary(records)
    summary.update(
        rounds=cfg.rounds,
        loop_s=loop_s,
        client_updates=updates,
        client_updates_per_s=updates / loop_s if loop_s > 0 else 0.0,
        init_acc=init_acc,
        deletion_audit=audit.summary(),
        **run_outcome(records),
    )
    summary.update(
        run_summary(
            records,
            num_tasks=scenario.num_tasks,
            sequential=scenario.is_sequential(),
            timeline=scenario.timeline,
            every=cfg.eval.every,
            tolerance=cfg.metrics.recovery_tolerance,
        )
    )
    if unlearning is not None:
        summary["unlearning"] = unlearning.summary(arrays)
    return RunResult(out_dir, summary, records, arrays, strategy)


def run_outcome(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's status from its round records, for summary.json.

    A run *failed* when no client update was aggregated in any round: every reply errored, was
    refused or timed out (or no round could train). A run in which some rounds, or all but one,
    lost clients or had no update at all *completed*; the summary counts the lost updates
    (`client_failures`) and lists the rounds without any (`rounds_without_updates`). `error`
    (failed runs only) is one line naming the first failure.
    """
    empty = [record["round"] for record in records if record.get("no_updates")]
    outcome: dict[str, Any] = {
        "status": "completed",
        "client_failures": sum(len(record["failures"]) for record in records),
        "rounds_without_updates": empty,
    }
    if records and len(empty) == len(records):
        outcome["status"] = "failed"
        outcome["error"] = (
            f"no client update succeeded in any of the {len(records)} rounds"
            + _first_failure(records)
        )
    return outcome


def _first_failure(records: list[dict[str, Any]]) -> str:
    for record in records:
        if record["failures"]:
            failure = record["failures"][0]
            return f" (round {record['round']}, node {failure['node']}: {failure['reason']})"
        if record.get("skipped"):
            return f" (round {record['round']}: {record['skipped']})"
    return ""


def _evaluate_round(cfg, scenario, evaluator, arrays, server_round, available) -> dict[str, Any]:
    """The round's record so far: accuracy on every seen task (+ the next, for transfer)."""
    task = scenario.global_task(server_round)
    seen = scenario.seen_tasks(server_round)
    has_next = plain_config(cfg)["eval"]["forward_transfer"] and task + 1 < scenario.num_tasks
    next_task = task + 1 if has_next and task + 1 not in seen else None
    # Concepts are weighted over every available client, not only this round's online ones.
    scores = evaluator.evaluate_round(arrays, server_round, available, next_task)
    record = {
        "round": server_round,
        "task": task,
        "acc": scores.acc,
        "acc_next": scores.acc_next,
        "avg_acc": mean(scores.acc.values()),
    }
    if scores.val_acc:
        record["val_acc"] = scores.val_acc
        record["val_avg_acc"] = mean(scores.val_acc.values())
    if scores.acc_by_concept:
        record["acc_by_concept"] = scores.acc_by_concept
        record["client_acc"] = scores.client_acc
    return record
