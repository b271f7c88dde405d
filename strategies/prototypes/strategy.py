"""Prototype averaging (Federated Reconnaissance) as a Flower Message-API strategy.

Hendryx, KC, Walls, Morrison, "Federated Reconnaissance: Efficient, Distributed, Class-Incremental
Learning" (2021); official code `ml4ai/fed-recon` (`FederatedProtoNet`). The math is in
`fedcl.strategies.prototypes.math`. The protocol:

1. Backbone: the model is trained federated (plain FedAvg) for ``backbone_rounds`` rounds, or for
   the whole first task; then it is frozen. (The paper meta-trains its encoder as a prototypical
   network on base classes; here the base classes are the first task's.)
2. Reconnaissance: from then on no gradient step is taken. Each round the sampled clients embed
   their data of the current task with the frozen backbone and send per-class embedding sums and
   counts (``query.prototypes``, answered by its client half,
   `fedcl.strategies.prototypes.client`); at each task end every client that did not answer in
   that round is asked too, so each task's prototypes cover all of
   its data.
3. Prediction is by the nearest prototype in squared Euclidean distance. fedcl evaluates
   ``model(x).argmax``, and argmin_c ‖e − p_c‖² = argmax_c (2 p_c·e − ‖p_c‖²), so the strategy
   writes the head from the prototypes: W_c = 2 p_c, b_c = −‖p_c‖², and for classes without a
   prototype W_c = 0, b_c = `UNKNOWN_CLASS_BIAS` (finite: the engine refuses non-finite arrays).

The server keeps one `PrototypeBank` (sums and counts) per (client, task). A client that answers
again for the same task *replaces* its bank for that task, so each of its samples counts once
however often it is asked, and a client whose data changed (samples deleted) is brought up to date
by asking it again (`recollect`). The global prototypes are the quotient of the banks' summed sums
and counts: the class means over the union of all contributed data, whatever the partition and the
order of replies (float64 sums). Removing a client, a class or samples is exact (`on_delete`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedcl.protocol import SERVER_ROUND, TASK
from fedcl.strategies.base import ClientExtension, ContinualStrategy, DeletionRequest, query_nodes
from fedcl.strategies.prototypes.client import PROTOTYPES_CLIENT
from fedcl.strategies.prototypes.keys import BANK_KEY, PROTOTYPES_QUERY
from fedcl.strategies.prototypes.math import PrototypeBank

# Bias of a class with no prototype: its logit never wins while some class is known, and stays
# finite in float32.
UNKNOWN_CLASS_BIAS = -1e30
# Records of `PrototypeAveraging.state_dict`.
STATE_BANKS = "prototypes.banks"
STATE_SCALARS = "prototypes.state"


class PrototypeAveraging(FedAvg, ContinualStrategy):
    """Federated Reconnaissance: a frozen backbone and count-weighted class prototypes.

    The global prototypes equal the class means of the embeddings of all data the clients
    contributed (through the frozen backbone), and removing a client or a class gives exactly the
    prototypes computed without it. The returned arrays are the backbone plus a head that
    predicts the nearest prototype.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of nodes sampled each round, for backbone training and prototype queries alike.
    fraction_evaluate : float (default: 1.0)
        Fraction of nodes for federated evaluation (as FedAvg; fedcl evaluates centrally).
    min_train_nodes : int (default: 2)
        Minimum number of nodes sampled each round.
    min_evaluate_nodes : int (default: 2)
        Minimum number of nodes for federated evaluation.
    min_available_nodes : int (default: 2)
        Minimum number of connected nodes before sampling.
    weighted_by_key : str (default: "num-examples")
        Metric that weights the FedAvg average during backbone training.
    arrayrecord_key : str (default: "arrays")
        Key of the model's ArrayRecord in messages.
    configrecord_key : str (default: "config")
        Key of the ConfigRecord in messages.
    train_metrics_aggr_fn : Optional[callable] (default: None)
        (list[RecordDict], str) -> MetricRecord for training metrics; None: weighted average.
    evaluate_metrics_aggr_fn : Optional[callable] (default: None)
        (list[RecordDict], str) -> MetricRecord for evaluation metrics; None: weighted average.
    backbone_rounds : Optional[int] (default: None)
        FedAvg rounds before the backbone freezes (after aggregation in that round); None:
        freeze at the end of the first task.
    head_prefix : str (default: "head")
        Module name of the linear classifier head whose input is the model's ``embed(x)``.
    collect_at_task_end : bool (default: True)
        At each task end (once frozen), ask every node that has not answered in that round for
        its prototypes of the task, so that every client's data of the task is counted.
    """

    # The banks' sums and counts lose a contribution exactly (`on_delete`); the frozen backbone
    # keeps what it learned from data deleted before it froze.
    exact_deletion = True

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
        backbone_rounds: int | None = None,
        head_prefix: str = "head",
        collect_at_task_end: bool = True,
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
        if backbone_rounds is not None and not (
            isinstance(backbone_rounds, int) and backbone_rounds >= 1
        ):
            raise ValueError(
                f"backbone_rounds must be None or an integer >= 1, got {backbone_rounds!r}"
            )
        self.backbone_rounds = backbone_rounds
        self.head_prefix = head_prefix
        self.collect_at_task_end = bool(collect_at_task_end)
        # State: whether the backbone is frozen, every (node, task)'s bank, and per round whether
        # it trains or queries, the arrays it was configured with and the nodes that answered.
        self.frozen = False
        self.banks: dict[int, dict[int, PrototypeBank]] = {}
        self._querying = False
        self._arrays: ArrayRecord | None = None
        self._answered: set[int] = set()

    def state_dict(self) -> RecordDict:
        """Whether the backbone is frozen, every (node, task) bank (stacked: node and task ids,
        sums, counts) and the round's query state. The arrays the round was configured with are
        not state: `configure_train` sets them again before `aggregate_train` reads them."""
        keys = [(node, task) for node, per_task in self.banks.items() for task in per_task]
        banks = [self.banks[node][task] for node, task in keys]
        return RecordDict(
            {
                STATE_BANKS: ArrayRecord(
                    {
                        "nodes": Array(np.asarray([n for n, _ in keys], dtype=np.int64)),
                        "tasks": Array(np.asarray([t for _, t in keys], dtype=np.int64)),
                        "sums": Array(
                            np.stack([b.sums for b in banks]) if banks else np.zeros((0, 0, 0))
                        ),
                        "counts": Array(
                            np.stack([b.counts for b in banks])
                            if banks
                            else np.zeros((0, 0), dtype=np.int64)
                        ),
                    }
                ),
                STATE_SCALARS: ConfigRecord(
                    {
                        "frozen": self.frozen,
                        "querying": self._querying,
                        "answered": sorted(int(n) for n in self._answered),
                    }
                ),
            }
        )

    def load_state_dict(self, state: RecordDict) -> None:
        """Take back the state `state_dict` returned."""
        record = state[STATE_BANKS]
        nodes, tasks = record["nodes"].numpy().tolist(), record["tasks"].numpy().tolist()
        sums, counts = record["sums"].numpy(), record["counts"].numpy()
        self.banks = {}
        for i, (node, task) in enumerate(zip(nodes, tasks, strict=True)):
            self.banks.setdefault(node, {})[task] = PrototypeBank(sums[i].copy(), counts[i].copy())
        scalars = state[STATE_SCALARS]
        self.frozen = bool(scalars["frozen"])
        self._querying = bool(scalars["querying"])
        self._answered = {int(n) for n in scalars["answered"]}

    def client_extension(self) -> ClientExtension:
        """The client half: the prototype query (`fedcl.strategies.prototypes.client`)."""
        return PROTOTYPES_CLIENT

    # --- rounds ----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg training messages until the backbone is frozen; then prototype queries to the
        nodes FedAvg's sampling picks."""
        self._arrays = arrays
        self._answered = set()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._querying = self.frozen
        if not self.frozen:
            return messages
        content = self._query_content(server_round, arrays)
        return [
            Message(content=content, message_type=PROTOTYPES_QUERY, dst_node_id=node)
            for node in (m.metadata.dst_node_id for m in messages)
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg during backbone training; once frozen, merge the replies' banks and write the
        nearest-prototype head."""
        if not self._querying:
            arrays, metrics = super().aggregate_train(server_round, replies)
            if self.backbone_rounds is not None and server_round >= self.backbone_rounds:
                self.frozen = True
            return arrays, metrics
        self._absorb(replies)
        if self._arrays is None:
            return None, self._metrics()
        return self.with_head(self._arrays), self._metrics()

    def on_task_end(
        self, server_round: int, task: int, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """Freeze the backbone after the first task (``backbone_rounds`` None); once frozen,
        collect the task's prototypes from every node not heard from in this round."""
        if not self.frozen and self.backbone_rounds is None:
            self.frozen = True
        if not (self.frozen and self.collect_at_task_end):
            return None
        missing = [n for n in sorted(grid.get_node_ids()) if n not in self._answered]
        if missing:
            self._absorb(self._query(grid, server_round, arrays, missing))
        return self.with_head(arrays)

    # --- deletion ----------------------------------------------------------------------------
    def remove_client(self, node_id: int) -> None:
        """Forget every prototype contribution of node `node_id` (exact)."""
        self.banks.pop(int(node_id), None)

    def remove_class(self, class_id: int, node_ids: Sequence[int] | None = None) -> None:
        """Forget class `class_id` in the contributions of `node_ids` (default every node); exact:
        its sums and counts become 0. Data of that class contributed later counts again."""
        chosen = self.banks if node_ids is None else {int(n) for n in node_ids}
        for node_id, per_task in self.banks.items():
            if node_id not in chosen:
                continue
            for task, bank in per_task.items():
                part = PrototypeBank.empty(bank.num_classes, bank.dim)
                part.sums[class_id] = bank.sums[class_id]
                part.counts[class_id] = bank.counts[class_id]
                per_task[task] = bank.without(part)

    def recollect(
        self,
        server_round: int,
        arrays: ArrayRecord,
        grid: Grid,
        node_ids: Sequence[int],
        task: int | None = None,
    ) -> ArrayRecord:
        """Ask `node_ids` again for their prototypes (of `task`, default their task of
        `server_round`) and replace their banks of that task; return arrays with the new head.

        After samples are deleted from a client's store, this makes its contribution exactly that
        of the data it still holds.
        """
        self._absorb(self._query(grid, server_round, arrays, node_ids, task))
        return self.with_head(arrays)

    def on_delete(
        self, deletion: DeletionRequest, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """Remove the deleted data's contribution exactly, before `deletion.server_round`.

        * "client": every contribution of `deletion.node_ids` is dropped.
        * "class": the classes `deletion.classes` are dropped from the banks of
          `deletion.node_ids` (of every node when that is empty).
        * "samples": each of `deletion.node_ids` is asked again, for every task it has
          contributed, for the prototypes of the data it still holds in that round (the deleted
          samples are gone from its store), replacing its banks: exactly the banks without them.

        Returns the arrays with the rewritten head; None while the backbone is still training
        (its weights already saw the data: only a rollback can unlearn that).
        """
        if not self.frozen:
            return None
        if deletion.what == "client":
            for node_id in deletion.node_ids:
                self.remove_client(node_id)
        elif deletion.what == "class":
            for class_id in deletion.classes:
                self.remove_class(class_id, deletion.node_ids or None)
        elif deletion.what == "samples":
            for node_id in sorted(deletion.node_ids):
                for task in sorted(self.banks.get(node_id, {})):
                    self.recollect(deletion.server_round, arrays, grid, [node_id], task)
        else:
            raise ValueError(f"unknown deletion kind {deletion.what!r}")
        return self.with_head(arrays)

    # --- the bank and the head ---------------------------------------------------------------
    def global_bank(self) -> PrototypeBank | None:
        """The sum of every (client, task) bank, in node then task order; None when empty."""
        total = None
        for node_id in sorted(self.banks):
            for task in sorted(self.banks[node_id]):
                bank = self.banks[node_id][task]
                total = bank if total is None else total.merged(bank)
        return total

    def with_head(self, arrays: ArrayRecord) -> ArrayRecord:
        """`arrays` with the head predicting the nearest global prototype (unchanged while no
        class has a prototype)."""
        bank = self.global_bank()
        if bank is None or not np.any(bank.counts > 0):
            return arrays
        weight_key, bias_key = f"{self.head_prefix}.weight", f"{self.head_prefix}.bias"
        shape = tuple(arrays[weight_key].shape)
        if shape != (bank.num_classes, bank.dim):
            raise ValueError(
                f"head {weight_key} has shape {shape} but the prototypes are "
                f"{(bank.num_classes, bank.dim)} (classes, embedding dim)"
            )
        known = bank.counts > 0
        protos = bank.prototypes()
        weight = np.zeros(shape, dtype=np.float32)
        bias = np.full(shape[0], UNKNOWN_CLASS_BIAS, dtype=np.float32)
        weight[known] = 2.0 * protos[known]
        bias[known] = -np.sum(protos[known] ** 2, axis=1)
        head = {weight_key: weight, bias_key: bias}
        return ArrayRecord(
            {name: Array(head[name]) if name in head else array for name, array in arrays.items()}
        )

    # --- internals ---------------------------------------------------------------------------
    def _query_content(
        self, server_round: int, arrays: ArrayRecord, task: int | None = None
    ) -> RecordDict:
        config = ConfigRecord({SERVER_ROUND: server_round})
        if task is not None:
            config[TASK] = task
        return RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})

    def _query(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        node_ids: Iterable[int],
        task: int | None = None,
    ) -> list[Message]:
        content = self._query_content(server_round, arrays, task)
        return query_nodes(grid, node_ids, PROTOTYPES_QUERY, content, label="prototypes")

    def _absorb(self, replies: Iterable[Message]) -> None:
        """Replace each answering node's bank of the task its reply is about."""
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "prototypes: node %d failed: %s", node_id, reply.error.reason)
                continue
            content = reply.content
            record = content[BANK_KEY]
            task = int(next(iter(content.metric_records.values()))[TASK])
            bank = PrototypeBank(record["sums"].numpy(), record["counts"].numpy())
            if not np.all(np.isfinite(bank.sums)):
                log(WARNING, "prototypes: node %d sent non-finite sums; ignored", node_id)
                continue
            self.banks.setdefault(node_id, {})[task] = bank
            self._answered.add(node_id)

    def _metrics(self) -> MetricRecord:
        bank = self.global_bank()
        if bank is None:
            return MetricRecord({"known-classes": 0, "prototype-examples": 0})
        return MetricRecord(
            {
                "known-classes": int(np.sum(bank.counts > 0)),
                "prototype-examples": int(bank.counts.sum()),
            }
        )
