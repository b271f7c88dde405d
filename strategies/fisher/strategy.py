"""Fisher-weighted model merging as a Flower Message-API strategy, with a continual variant.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging" (NeurIPS 2022); official code
`mmatena/model_merging` (`fisher.py`, `merging.py`). The math is in `fedcl.strategies.fisher.math`.

Every round the sampled clients train as in FedAvg and also return the diagonal Fisher of their
trained model on their data (the train extra ``fisher-mode`` of its client half,
`fedcl.strategies.fisher.client`). The server merges per coordinate,
θ = Σ λ_k F̃_k θ_k / Σ λ_k F̃_k, with λ_k ∝ the clients' example counts and
F̃_k = max(F_k, floor) (`fisher_merge`).

Continual variant (``prior_weight`` γ > 0): at each task end the server asks every client for the
Fisher of the *merged global* model on its data of the finished task (``query.fisher``), adds the
sample-weighted mean of those Fishers to F_old (summed over tasks, as online EWC) and keeps the
global model θ_old. From then on the merge also includes θ_old with weight γ·F_old, i.e. the
Laplace posterior of the old tasks enters the product like one more model:
θ = (Σ λ_k F̃_k θ_k + γ F_old θ_old) / (Σ λ_k F̃_k + γ F_old). The Fisher is taken at the merged
model rather than summed from the clients' last-round Fishers because EWC's quadratic
approximation is around the point it protects (θ_old), and it covers every client holding the
task, not only the last round's sample.

Departures from the official code: the floor applies to every client (federated averaging has no
"target" model to favour), λ are data-size weights instead of a searched grid (the search needs
held-out data the server does not have), and Fishers are not normalised by their norms unless
``normalize_fishers`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedcl.protocol import NUM_EXAMPLES, SERVER_ROUND, TASK
from fedcl.strategies.base import ClientExtension, ContinualStrategy, query_nodes
from fedcl.strategies.fisher.client import FISHER_CLIENT
from fedcl.strategies.fisher.keys import (
    FISHER_BATCH_SIZE,
    FISHER_EXAMPLES,
    FISHER_KEY,
    FISHER_MODE,
    FISHER_QUERY,
)
from fedcl.strategies.fisher.math import FISHER_MODES, fisher_merge

# Records of `FisherMerging.state_dict`.
STATE_THETA_OLD = "fisher.theta-old"
STATE_FISHER_OLD = "fisher.fisher-old"


class FisherMerging(FedAvg, ContinualStrategy):
    """Fisher-weighted averaging of the clients' models; optionally anchored to old tasks.

    With equal Fishers the merge is the example-weighted average (FedAvg); a coordinate that only
    one client's Fisher cares about takes that client's value (up to the floor).

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of nodes sampled for training each round (as FedAvg).
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes for federated evaluation (as FedAvg; fedcl evaluates centrally).
    min_train_nodes : int (default: 2)
        Minimum number of nodes sampled for training.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes for federated evaluation.
    min_available_nodes : int (default: 2)
        Minimum number of connected nodes before sampling.
    weighted_by_key : str (default: "num-examples")
        Metric giving each client's merge weight λ_k (normalised to sum 1).
    arrayrecord_key : str (default: "arrays")
        Key of the model's ArrayRecord in messages.
    configrecord_key : str (default: "config")
        Key of the ConfigRecord in messages.
    train_metrics_aggr_fn : Optional[callable] (default: None)
        (list[RecordDict], str) -> MetricRecord for training metrics; None: weighted average.
    evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        (list[RecordDict], str) -> MetricRecord for evaluation metrics; None: weighted average.
    fisher_mode : str (default: "expected")
        "expected": the exact expectation over the model's labels (the paper's and official
        code's Fisher); "sampled": one label drawn from the model per example; "empirical": the
        true labels (the empirical Fisher).
    fisher_examples : int (default: 4096)
        At most this many of a client's examples (a seeded random subset when it has more) enter
        its Fisher (official ``--n_examples 4096``).
    fisher_batch_size : int (default: 64)
        Examples per vectorised per-example-gradient batch on the client (speed only).
    fisher_floor : float (default: 1e-6)
        Lower bound on every client's Fisher (official ``fisher_floor``).
    normalize_fishers : bool (default: False)
        Divide each client's λ_k by the L2 norm of its whole Fisher (official
        ``normalize_fishers``), so only the Fisher's shape, not its scale, decides.
    prior_weight : float (default: 0.0)
        γ ≥ 0 of the continual variant; 0 is plain Fisher merging. With γ = 1 the old tasks'
        accumulated Fisher counts as much as the current round's mean client Fisher per task.
    """

    # pylint: disable=too-many-arguments,too-many-instance-attributes
    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        *,
        fisher_mode: str = "expected",
        fisher_examples: int = 4096,
        fisher_batch_size: int = 64,
        fisher_floor: float = 1e-6,
        normalize_fishers: bool = False,
        prior_weight: float = 0.0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if fisher_mode not in FISHER_MODES:
            raise ValueError(f"fisher_mode must be one of {FISHER_MODES}, got {fisher_mode!r}")
        for name, value in (
            ("fisher_examples", fisher_examples),
            ("fisher_batch_size", fisher_batch_size),
        ):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(fisher_floor, int | float) and fisher_floor > 0):
            raise ValueError(f"fisher_floor must be > 0, got {fisher_floor!r}")
        if not (
            isinstance(prior_weight, int | float)
            and np.isfinite(prior_weight)
            and prior_weight >= 0
        ):
            raise ValueError(f"prior_weight must be a finite number >= 0, got {prior_weight!r}")
        self.fisher_mode = fisher_mode
        self.fisher_examples = fisher_examples
        self.fisher_batch_size = fisher_batch_size
        self.fisher_floor = float(fisher_floor)
        self.normalize_fishers = bool(normalize_fishers)
        self.prior_weight = float(prior_weight)
        # Continual state: the global model at the last task end and the Fisher accumulated on
        # all finished tasks (parameter name -> float64 array); None before the first task end.
        self.theta_old: dict[str, np.ndarray] | None = None
        self.fisher_old: dict[str, np.ndarray] | None = None

    def state_dict(self) -> RecordDict:
        """The continual variant's θ_old and F_old (float64; records absent while None)."""
        state = RecordDict()
        for key, arrays in ((STATE_THETA_OLD, self.theta_old), (STATE_FISHER_OLD, self.fisher_old)):
            if arrays is not None:
                state[key] = ArrayRecord({n: Array(np.asarray(a)) for n, a in arrays.items()})
        return state

    def load_state_dict(self, state: RecordDict) -> None:
        """Take back the state `state_dict` returned."""
        self.theta_old, self.fisher_old = (
            {n: a.numpy() for n, a in state[key].items()} if key in state else None
            for key in (STATE_THETA_OLD, STATE_FISHER_OLD)
        )

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(
            INFO,
            "\t└──> Fisher: %s over <= %d examples, floor %g, prior weight %g",
            self.fisher_mode,
            self.fisher_examples,
            self.fisher_floor,
            self.prior_weight,
        )

    def _fisher_config(self, config: ConfigRecord) -> ConfigRecord:
        config[FISHER_MODE] = self.fisher_mode
        config[FISHER_EXAMPLES] = self.fisher_examples
        config[FISHER_BATCH_SIZE] = self.fisher_batch_size
        return config

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's training messages, whose config also asks for the trained model's Fisher."""
        return super().configure_train(server_round, arrays, self._fisher_config(config), grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Merge the replies' models by their Fishers (and the old-task prior, if any)."""
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        usable = []
        for reply in valid_replies:
            content = reply.content
            problem = self._reply_problem(content)
            if problem:
                log(
                    WARNING,
                    "Fisher merging: node %d ignored: %s",
                    reply.metadata.src_node_id,
                    problem,
                )
                continue
            usable.append(content)
        if not usable:
            return None, None
        models = [content[self.arrayrecord_key] for content in usable]
        names = list(models[0].keys())
        weights = [float(_metrics(c)[self.weighted_by_key]) for c in usable]
        params, fishers = [], []
        for content, model in zip(usable, models, strict=True):
            fisher = content[FISHER_KEY]
            params.append([model[n].numpy() for n in names])
            # Arrays without a Fisher (buffers) get F = 1: a plain weighted average.
            fishers.append(
                [fisher[n].numpy() if n in fisher else np.ones(model[n].shape) for n in names]
            )
        if self.normalize_fishers:
            weights = [
                w
                / max(
                    float(np.sqrt(sum(np.sum(np.square(f, dtype=np.float64)) for f in fk))), 1e-30
                )
                for w, fk in zip(weights, fishers, strict=True)
            ]
        prior = None
        if self.prior_weight > 0 and self.fisher_old is not None and self.theta_old is not None:
            prior = (
                [self.theta_old[n] for n in names],
                [self.fisher_old.get(n, np.zeros(self.theta_old[n].shape)) for n in names],
                self.prior_weight,
            )
        merged = fisher_merge(params, fishers, weights, floor=self.fisher_floor, prior=prior)
        arrays = ArrayRecord(
            {
                n: Array(np.ascontiguousarray(m.astype(models[0][n].numpy().dtype)))
                for n, m in zip(names, merged, strict=True)
            }
        )
        metrics = self.train_metrics_aggr_fn(usable, self.weighted_by_key)
        return arrays, metrics

    def client_extension(self) -> ClientExtension:
        """The client half: the Fisher train extra and query (`fedcl.strategies.fisher.client`)."""
        return FISHER_CLIENT

    def on_task_end(
        self, server_round: int, task: int, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """Continual variant only: accumulate the merged model's Fisher on the finished task.

        Every node is asked (``query.fisher``) for the Fisher of `arrays` on its data of `task`;
        F_old += Σ_k (n_k / Σ n) F_k and θ_old ← `arrays`. The arrays are unchanged (None).
        """
        if self.prior_weight <= 0:
            return None
        config = self._fisher_config(ConfigRecord({SERVER_ROUND: server_round, TASK: task}))
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        nodes = sorted(grid.get_node_ids())
        replies = query_nodes(grid, nodes, FISHER_QUERY, content, label="Fisher merging")
        contributions: list[tuple[float, ArrayRecord]] = []
        for reply in replies:
            count = float(_metrics(reply.content)[NUM_EXAMPLES])
            if count > 0 and FISHER_KEY in reply.content.array_records:
                contributions.append((count, reply.content[FISHER_KEY]))
        if not contributions:
            log(WARNING, "Fisher merging: no Fisher at the end of task %d; prior unchanged", task)
            return None
        total = sum(count for count, _ in contributions)
        task_fisher: dict[str, np.ndarray] = {}
        for count, record in contributions:
            for name in record:
                value = record[name].numpy().astype(np.float64)
                if not np.all(np.isfinite(value)) or np.any(value < 0):
                    raise ValueError(f"a client's Fisher of {name!r} is negative or not finite")
                part = (count / total) * value
                task_fisher[name] = part if name not in task_fisher else task_fisher[name] + part
        old = self.fisher_old or {}
        self.fisher_old = {n: old.get(n, 0.0) + f for n, f in task_fisher.items()}
        self.theta_old = {name: arrays[name].numpy().astype(np.float64) for name in arrays}
        return None

    def _reply_problem(self, content: RecordDict) -> str | None:
        """Why a train reply cannot be merged, or None."""
        if self.arrayrecord_key not in content.array_records:
            return f"no '{self.arrayrecord_key}' ArrayRecord"
        if FISHER_KEY not in content.array_records:
            return f"no '{FISHER_KEY}' ArrayRecord (is the client app fedcl's?)"
        if len(content.metric_records) != 1:
            return "expected exactly one MetricRecord"
        if self.weighted_by_key not in _metrics(content):
            return f"no '{self.weighted_by_key}' metric"
        model, fisher = content[self.arrayrecord_key], content[FISHER_KEY]
        for name in fisher:
            if name not in model or tuple(fisher[name].shape) != tuple(model[name].shape):
                return f"Fisher '{name}' does not match the model's arrays"
        return None


def _metrics(content: RecordDict) -> MetricRecord:
    """The one MetricRecord of a reply."""
    return next(iter(content.metric_records.values()))
