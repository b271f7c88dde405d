"""Federated Orthogonal Training (FOT) as a Flower Message-API strategy.

Bakman, Yaldiz, Ezzeldin, Avestimehr, "Federated Orthogonal Training: Mitigating Global
Catastrophic Forgetting in Continual Federated Learning" (ICLR 2024); official code
`duygunuryldz/Federated_Orthogonal_Training` (`fedavg_seq_cont/FedAVGAggregator.py`). The math is
in `fedcl.strategies.fot.math`; this module decides when it runs:

* every round, clients train as in FedAvg; the server averages (uniformly, as the official
  ``get_average_weight``) and replaces the update G = W_global − W_avg of every protected layer
  by G (I − U Uᵀ) (`project_update`), so the layer's response to old tasks' inputs is unchanged;
* after the last round of each task (`on_task_end`), it asks clients for their sketched residual
  activations (``query.fot_activations``, answered by its client half,
  `fedcl.strategies.fot.client`), sums them and grows each layer's basis U by SVD with the energy
  threshold ε (`expand_basis`); then ε += Δε.

Departures from the official code, each for a stated reason:

* The activations are taken through the aggregated global model after the task's last round,
  in a query of their own; the official clients take them through their *locally trained*
  model during that last round. The subspace that must be protected is that of the inputs the
  global model's layers see, which is what the query measures.
* The numerical safeguards of `expand_basis` (no new vector when the threshold is already met,
  rank cap, dropping directions already in the basis) are described there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedcl.protocol import NUM_EXAMPLES, SERVER_ROUND
from fedcl.strategies.base import ClientExtension, ContinualStrategy, query_nodes
from fedcl.strategies.fot.client import FOT_CLIENT
from fedcl.strategies.fot.keys import (
    ACTIVATIONS_QUERY,
    BASES_KEY,
    BASIS_METRIC_PREFIX,
    LAYERS,
    PROJECTION,
    RATIO_PREFIX,
    SKETCH_FACTOR,
    SKETCHES_KEY,
)
from fedcl.strategies.fot.math import (
    PROJECTION_KINDS,
    expand_basis,
    mean_residual_ratio,
    project_update,
)

ACTIVATION_CLIENTS = ("sampled", "all")
# Records of `FOT.state_dict`.
STATE_BASES = "fot.bases"
STATE_SCALARS = "fot.state"


def _orthonormalize(columns: torch.Tensor) -> torch.Tensor:
    """QR with R's diagonal made positive, so orthonormal columns come back unchanged."""
    q, r = torch.linalg.qr(columns)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


class FOT(FedAvg, ContinualStrategy):
    """Federated Orthogonal Training: FedAvg whose aggregated updates avoid old tasks' subspaces.

    After aggregation, the update of every protected layer is orthogonal to the stored basis of
    that layer's old-task inputs; the basis stays orthonormal and grows only at task ends.

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
        Metric that weights the metric average, and the model average when
        ``uniform_weights`` is False.
    arrayrecord_key : str (default: "arrays")
        Key of the model's ArrayRecord in messages.
    configrecord_key : str (default: "config")
        Key of the ConfigRecord in messages.
    train_metrics_aggr_fn : Optional[callable] (default: None)
        (list[RecordDict], str) -> MetricRecord for training metrics; None: weighted average.
    evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        (list[RecordDict], str) -> MetricRecord for evaluation metrics; None: weighted average.
    uniform_weights : bool (default: True)
        Average client models with weights 1/|S| as the official code; False: weight by
        ``weighted_by_key`` as FedAvg.
    threshold : float (default: 0.96)
        ε in [0, 1], the share of the activation energy a layer's basis must cover after the
        first task (official PMNIST value; 0 keeps every basis empty, i.e. plain FedAvg).
    threshold_increment : float (default: 0.0)
        Added to ε after every task end (official: 0 for PMNIST, 0.001 otherwise); ε stays ≤ 1.
    projection : str (default: "uniform")
        Entries of the clients' private random matrices: "uniform" U(−1, 1) (official MLP) or
        "gaussian" N(0, 1) (official AlexNet/ResNet).
    sketch_factor : int (default: 1)
        m = sketch_factor · d columns per sketch (official: 1 for the MLP, 5 for ResNet).
    protected_layers : Optional[list[str]] (default: None)
        Module names (e.g. "features.1") of the Linear/Conv layers whose weights are projected.
        None: every module whose ``<name>.weight`` has at least two dimensions.
    protect_head : bool (default: True)
        With ``protected_layers`` None, include the ``head_prefix`` module. The official PMNIST
        MLP protects its single shared output layer (``layers.9``); only task-specific heads of
        multi-head models are left out, and fedcl's models have one shared head.
    head_prefix : str (default: "head")
        Module name of the classifier head.
    activation_clients : str (default: "sampled")
        Which nodes are asked for activations at a task end: "sampled" (those trained in the
        task's last round, as the official code) or "all".
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
        uniform_weights: bool = True,
        threshold: float = 0.96,
        threshold_increment: float = 0.0,
        projection: str = "uniform",
        sketch_factor: int = 1,
        protected_layers: list[str] | None = None,
        protect_head: bool = True,
        head_prefix: str = "head",
        activation_clients: str = "sampled",
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
        if not (isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if not (isinstance(threshold_increment, int | float) and threshold_increment >= 0):
            raise ValueError(f"threshold_increment must be >= 0, got {threshold_increment!r}")
        if projection not in PROJECTION_KINDS:
            raise ValueError(f"projection must be one of {PROJECTION_KINDS}, got {projection!r}")
        if not (isinstance(sketch_factor, int) and sketch_factor >= 1):
            raise ValueError(f"sketch_factor must be an integer >= 1, got {sketch_factor!r}")
        if activation_clients not in ACTIVATION_CLIENTS:
            raise ValueError(
                f"activation_clients must be one of {ACTIVATION_CLIENTS}, "
                f"got {activation_clients!r}"
            )
        if protected_layers is not None and not all(isinstance(n, str) for n in protected_layers):
            raise ValueError(f"protected_layers must be module names, got {protected_layers!r}")
        self.uniform_weights = bool(uniform_weights)
        self.threshold = float(threshold)
        self.threshold_increment = float(threshold_increment)
        self.projection = projection
        self.sketch_factor = sketch_factor
        self.protected_layers = None if protected_layers is None else list(protected_layers)
        self.protect_head = bool(protect_head)
        self.head_prefix = head_prefix
        self.activation_clients = activation_clients
        # State: the current ε, each protected layer's basis (float64, orthonormal columns), the
        # global arrays of the round being trained and the nodes sampled for it.
        self.epsilon = self.threshold
        self.bases: dict[str, torch.Tensor] = {}
        self._global: dict[str, np.ndarray] | None = None
        self._sampled: list[int] = []

    def state_dict(self) -> RecordDict:
        """ε, every protected layer's basis (float64) and the nodes sampled last (those
        `on_task_end` asks). The global arrays of the round are not state: `configure_train`
        sets them again before `aggregate_train` reads them."""
        return RecordDict(
            {
                STATE_BASES: ArrayRecord(
                    {layer: Array(basis.numpy()) for layer, basis in self.bases.items()}
                ),
                STATE_SCALARS: ConfigRecord(
                    {"epsilon": self.epsilon, "sampled": [int(n) for n in self._sampled]}
                ),
            }
        )

    def load_state_dict(self, state: RecordDict) -> None:
        """Take back the state `state_dict` returned."""
        self.bases = {
            layer: torch.from_numpy(array.numpy().copy(order="K"))  # keep QR's column order
            for layer, array in state[STATE_BASES].items()
        }
        scalars = state[STATE_SCALARS]
        self.epsilon = float(scalars["epsilon"])
        self._sampled = [int(n) for n in scalars["sampled"]]

    def summary(self) -> None:
        """Log the configuration."""
        super().summary()
        log(
            INFO,
            "\t├──> FOT: threshold %.4f (+%.4f per task)",
            self.threshold,
            self.threshold_increment,
        )
        log(INFO, "\t└──> projection %s, m = %d·d", self.projection, self.sketch_factor)

    def layer_names(self, arrays: ArrayRecord) -> list[str]:
        """The module names of the protected layers of a model with these arrays."""
        if self.protected_layers is not None:
            for name in self.protected_layers:
                weight = arrays.get(f"{name}.weight")
                if weight is None or len(weight.shape) < 2:
                    raise ValueError(
                        f"protected layer {name!r} has no weight with >= 2 dimensions in the model"
                    )
            return list(self.protected_layers)
        head = self.head_prefix + "."
        return [
            key.removesuffix(".weight")
            for key, array in arrays.items()
            if key.endswith(".weight")
            and len(array.shape) >= 2
            and (self.protect_head or not key.startswith(head))
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Configure training as FedAvg; remember the global arrays the update is taken from."""
        self._global = {name: array.numpy() for name, array in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._sampled = sorted(m.metadata.dst_node_id for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the replies, then project each protected layer's update off its basis.

        New W = W_global − P(W_global − W_avg) for protected weights, W_avg for everything else.
        """
        valid_replies, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid_replies:
            return None, None
        contents = [msg.content for msg in valid_replies]
        if self.uniform_weights:
            weights = [1.0] * len(contents)
        else:
            weights = [float(_metrics(c)[self.weighted_by_key]) for c in contents]
        average = _weighted_average([_model(c, self.arrayrecord_key) for c in contents], weights)

        if self.bases and self._global is None:
            raise RuntimeError("FOT.aggregate_train needs configure_train to have run first")
        new: dict[str, Array] = {}
        for name, value in average.items():
            layer = name.removesuffix(".weight")
            basis = self.bases.get(layer) if name.endswith(".weight") else None
            if basis is not None and self._global is not None:
                old = torch.from_numpy(self._global[name].astype(np.float64))
                update = project_update(old - torch.from_numpy(value), basis)
                value = (old - update).numpy()
            dtype = self._global[name].dtype if self._global is not None else np.float32
            new[name] = Array(np.ascontiguousarray(value.astype(dtype)))
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        for layer, basis in self.bases.items():
            metrics[BASIS_METRIC_PREFIX + layer] = int(basis.shape[1])
        return ArrayRecord(new), metrics

    def client_extension(self) -> ClientExtension:
        """The client half: the activation query (`fedcl.strategies.fot.client`)."""
        return FOT_CLIENT

    def on_task_end(
        self, server_round: int, task: int, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """Grow every protected layer's basis from the clients' sketched activations (GPSE).

        Sums the sketches Y = Σ_k R_k Q_k, takes the sample-weighted mean residual ratio r̄ and
        calls `expand_basis` with the current ε; then ε ← min(1, ε + threshold_increment). The
        global arrays are unchanged (returns None).
        """
        layers = self.layer_names(arrays)
        if self.activation_clients == "sampled" and self._sampled:
            node_ids = list(self._sampled)
        else:
            node_ids = sorted(grid.get_node_ids())
        config = ConfigRecord(
            {
                SERVER_ROUND: server_round,
                LAYERS: layers,
                PROJECTION: self.projection,
                SKETCH_FACTOR: self.sketch_factor,
            }
        )
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        if self.bases:
            content[BASES_KEY] = ArrayRecord(
                {name: Array(basis.float().numpy()) for name, basis in self.bases.items()}
            )
        replies = query_nodes(grid, node_ids, ACTIVATIONS_QUERY, content, label="FOT")
        usable = [r.content for r in replies if int(_metrics(r.content)[NUM_EXAMPLES]) > 0]
        if usable:
            for layer in layers:
                self._expand(layer, usable)
        else:
            log(WARNING, "FOT: no activations at the end of task %d; bases unchanged", task)
        self.epsilon = min(1.0, self.epsilon + self.threshold_increment)
        return None

    def _expand(self, layer: str, contents: list[RecordDict]) -> None:
        """Expand `layer`'s basis from the clients' sketches, ratios and counts."""
        total = None
        ratios, counts = [], []
        for content in contents:
            sketch = content[SKETCHES_KEY][layer].numpy().astype(np.float64)
            if not np.all(np.isfinite(sketch)):
                raise ValueError(f"FOT: a client's sketch of layer {layer!r} is not finite")
            if total is not None and sketch.shape != total.shape:
                raise ValueError(
                    f"FOT: sketches of layer {layer!r} differ in shape: "
                    f"{sketch.shape} vs {total.shape}"
                )
            total = sketch if total is None else total + sketch
            metrics = _metrics(content)
            ratios.append(float(metrics[RATIO_PREFIX + layer]))
            counts.append(int(metrics[NUM_EXAMPLES]))
        old = self.bases.get(layer)
        known = 0 if old is None else old.shape[1]
        # Tolerances follow the clients' float32 precision (the sketch's dtype); the basis is
        # kept in float64 so projections stay orthogonal to it far below that noise.
        grown = expand_basis(
            None if old is None else old.float(),
            torch.from_numpy(total).float(),
            mean_residual_ratio(ratios, counts),
            self.epsilon,
        )
        if grown.shape[1] == known:
            return
        new = grown[:, known:].double()
        if old is not None:
            new = torch.cat([old, new], dim=1)
        self.bases[layer] = _orthonormalize(new)


def _metrics(content: RecordDict) -> MetricRecord:
    """The one MetricRecord of a reply."""
    return next(iter(content.metric_records.values()))


def _model(content: RecordDict, key: str) -> ArrayRecord:
    """The model ArrayRecord of a train reply (under `key`, or the only one)."""
    if key in content.array_records:
        return content.array_records[key]
    return next(iter(content.array_records.values()))


def _weighted_average(records: list[ArrayRecord], weights: list[float]) -> dict[str, np.ndarray]:
    """Σ_k w_k W_k / Σ_k w_k per array, in float64."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {weights}")
    average: dict[str, np.ndarray] = {}
    for record, weight in zip(records, weights, strict=True):
        for name, array in record.items():
            part = array.numpy().astype(np.float64) * (weight / total)
            average[name] = part if name not in average else average[name] + part
    return average
