"""Summing FedAvg-family updates where they are trained: on the actors, not on the driver.

Flower's FedAvg (and FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, which aggregate through it)
reduces the train replies to Σ wᵢ·xᵢ / Σ wᵢ. That sum can be taken in parts. Each actor sums its
clients' weighted arrays (`ArraySum`) and sends back one sum and, per client, a *stub* reply: the
client's metrics and audit record without the arrays. The driver adds the actors' sums and hands the
strategy one reply holding the average (`combine`). What crosses the object store per round shrinks
from one model per client to one per actor, and the driver no longer decodes every client's model.

Exactness: every product wᵢ·xᵢ is taken in float64 and the sums are kept as an unevaluated pair
(s, c) with s + c equal to the exact sum to about 2⁻¹⁰⁰ relative (Knuth's TwoSum, an error-free
transformation), so the average no longer depends on how clients were split over actors: 1 or 2
actors give the same bits. It is the correctly rounded weighted mean, where Flower's own float32
loop rounds at every client; the two agree to float32 rounding.

Only strategies whose `aggregate_train` is one of Flower's FedAvg-family methods, unchanged, with
the default metric aggregation, are summed this way (`sum_plan`); every other strategy gets every
reply, as in Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common import MessageType
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedcl.engine.replies import (
    COMPILED_DTYPES,
    ReplyLimits,
    compiled_kernels,
    metric_problem,
    reply_problem,
    stacked_problems,
)
from fedcl.npy import array_of, array_record_of, values_of
from fedcl.protocol import ARRAYS

if TYPE_CHECKING:
    from fedcl.client.app import StackedArrays

# Flower's aggregate_train methods that reduce the replies by FedAvg's weighted mean first.
_LINEAR_AGGREGATES = frozenset(
    cls.__dict__["aggregate_train"] for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
)
SUMMED_KEY = "fedcl.summed"  # ConfigRecord marking a stub reply: its arrays went into a sum


@dataclass(frozen=True)
class SumPlan:
    """How the actors sum the train replies of round `server_round`: the ArrayRecord to sum (the
    strategy's `arrayrecord_key`) and the metric that weights it (`weighted_by_key`)."""

    array_key: str
    weight_key: str
    server_round: int = 0


def sum_plan(strategy: object, server_round: int = 0) -> SumPlan | None:
    """The plan for `strategy` in `server_round`, or None when its aggregation is not FedAvg's
    weighted mean (a subclass overriding `aggregate_train`, custom metric aggregation, robust or
    continual strategies)."""
    if not isinstance(strategy, FedAvg):
        return None
    aggregate = getattr(type(strategy), "aggregate_train", None)
    if aggregate not in _LINEAR_AGGREGATES:
        return None
    if strategy.train_metrics_aggr_fn is not aggregate_metricrecords:
        return None
    return SumPlan(strategy.arrayrecord_key, strategy.weighted_by_key, server_round)


class _Scratch:
    """Reused float64 buffers of one array: fresh arrays this size would cost a page fault per
    4 KiB on every add."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.term, self.spare, self.back, self.error = (np.empty(shape) for _ in range(4))


@dataclass
class ArraySum:
    """Σ wᵢ·xᵢ per array name, as float64 (s, c) pairs with s + c the exact sum (TwoSum), and
    Σ wᵢ. Adding the same terms in any grouping or order gives the same `mean()`. It holds six
    float64 copies of the model while summing; pickled, only the two sums travel."""

    high: dict[str, np.ndarray] = field(default_factory=dict)
    low: dict[str, np.ndarray] = field(default_factory=dict)
    weight: float = 0
    count: int = 0
    dtypes: dict[str, np.dtype] = field(default_factory=dict)
    _scratch: dict[str, _Scratch] = field(default_factory=dict, repr=False)

    def add(self, arrays: ArrayRecord, weight: float) -> None:
        """Add `weight` × `arrays`."""
        stacked = {name: values_of(array)[np.newaxis] for name, array in arrays.items()}
        self.add_rows(stacked, [0], [weight])

    def add_rows(
        self, arrays: Mapping[str, np.ndarray], rows: Sequence[int], weights: Sequence[float]
    ) -> None:
        """Add `weights[j]` × row `rows[j]` of every stacked array ((clients, *shape) each)."""
        size = sum(values[0].size for values in arrays.values() if len(values))
        kernels = compiled_kernels(size * len(rows))
        for name, values in arrays.items():
            if kernels is not None and values.dtype in COMPILED_DTYPES:
                self._add_compiled(kernels, name, values, rows, weights)
                continue
            for row, weight in zip(rows, weights, strict=True):
                self._add_values(name, values[row], weight)
        self.weight += sum(weights)
        self.count += len(rows)

    def _add_compiled(
        self,
        kernels: ModuleType,
        name: str,
        stack: np.ndarray,
        rows: Sequence[int],
        weights: Sequence[float],
    ) -> None:
        """`add_rows` for one array, in compiled loops: the same arithmetic in the same order."""
        self._start(name, stack.shape[1:], stack.dtype)
        kernels.accumulate_rows(
            self.high[name].reshape(-1),
            self.low[name].reshape(-1),
            stack.reshape(len(stack), -1),
            rows,
            weights,
        )

    def _add_values(self, name: str, values: np.ndarray, weight: float) -> None:
        self._start(name, values.shape, values.dtype)
        term = self._scratch_of(name).term
        # In float64 (not numpy's float32 x scalar): exact for integer weights below 2**29.
        np.multiply(values, weight, out=term, dtype=np.float64)
        self._accumulate(name, term)

    def merge(self, other: ArraySum) -> None:
        """Add everything `other` holds."""
        kernels = compiled_kernels(2 * sum(high.size for high in other.high.values()))
        for name in other.high:
            self._start(name, other.high[name].shape, other.dtypes[name])
            for part in (other.high[name], other.low[name]):
                if kernels is not None:
                    self._add_compiled(kernels, name, part[np.newaxis], [0], [1.0])
                else:
                    self._accumulate(name, part)
        self.weight += other.weight
        self.count += other.count

    def mean(self) -> ArrayRecord:
        """Σ wᵢ·xᵢ / Σ wᵢ in each array's own dtype."""
        return array_record_of(
            {
                name: array_of(((self.high[name] + self.low[name]) / self.weight).astype(dtype))
                for name, dtype in self.dtypes.items()
            }
        )

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_scratch"] = {}
        return state

    def _start(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        if name not in self.high:
            self.high[name], self.low[name] = np.zeros(shape), np.zeros(shape)
            self.dtypes[name] = dtype

    def _scratch_of(self, name: str) -> _Scratch:
        if name not in self._scratch:
            self._scratch[name] = _Scratch(self.high[name].shape)
        return self._scratch[name]

    def _accumulate(self, name: str, term: np.ndarray) -> None:
        """high + low += term, keeping high + low exact (Knuth's TwoSum on every element)."""
        high, low, scratch = self.high[name], self.low[name], self._scratch_of(name)
        total, back, error = scratch.spare, scratch.back, scratch.error
        np.add(high, term, out=total)
        np.subtract(total, high, out=back)
        # The rounding error of high + term: (high - (total - back)) + (term - back).
        np.subtract(total, back, out=error)
        np.subtract(high, error, out=error)
        np.subtract(term, back, out=back)
        np.add(error, back, out=error)
        np.add(low, error, out=low)
        self.high[name], scratch.spare = total, high


def sum_replies(
    requests: Sequence[Message],
    replies: Sequence[Message],
    plan: SumPlan,
    limits: Callable[[int], ReplyLimits] | None = None,
    stacked: Sequence[StackedArrays] = (),
) -> tuple[list[Message], ArraySum]:
    """On an actor: sum the train replies that FedAvg would aggregate and replace each by a stub.

    A reply is summed only if it is a train reply without error that passes the driver's screen
    (`reply_problem` with `limits` of its node: the request's array names and shapes, finite
    values, a valid `plan.weight_key`, the update bound) and holds exactly one ArrayRecord and
    one MetricRecord; any other reply goes to the driver whole, to be screened and aggregated (or
    refused by the strategy) there exactly as without summing.

    The replies listed in `stacked` left their model arrays stacked there (vectorized training);
    they are screened together (`stacked_problems`) and summed row by row. One that fails goes
    to the driver whole, its arrays put back, where `reply_problem` says why it is refused.
    """
    total = ArraySum()
    out = list(replies)
    in_stack: set[int] = set()
    for group in stacked:
        in_stack.update(group.positions)
        rows, weights = _sum_group(requests, out, group, plan, limits)
        total.add_rows(group.arrays, rows, weights)
    for i, (request, reply) in enumerate(zip(requests, replies, strict=True)):
        if i in in_stack:
            continue
        node_limits = limits(reply.metadata.src_node_id) if limits is not None else None
        summable = _summable(request, reply, plan, node_limits)
        if summable is None:
            continue
        total.add(reply.content.array_records[plan.array_key], summable)
        stub = RecordDict({SUMMED_KEY: ConfigRecord()})
        for name, record in reply.content.items():
            if name != plan.array_key:
                stub[name] = record
        out[i] = make_message(reply.metadata, stub)
    return out, total


def _sum_group(
    requests: Sequence[Message],
    replies: list[Message],
    group: StackedArrays,
    plan: SumPlan,
    limits: Callable[[int], ReplyLimits] | None,
) -> tuple[list[int], list[float]]:
    """The rows of `group` to sum and their weights; the replies of those rows become stubs in
    `replies`, the others get their arrays back (under `ARRAYS`, where the ClientApp puts them)."""
    reference = requests[group.positions[0]].content.array_records.get(plan.array_key)
    members = [replies[i] for i in group.positions]
    node_limits = [
        limits(reply.metadata.src_node_id) if limits is not None else ReplyLimits()
        for reply in members
    ]
    problems: list[str | None] = [f"the plan sums '{plan.array_key}'"] * len(members)
    if plan.array_key == ARRAYS and reference is not None:
        problems = stacked_problems(group.arrays, reference, node_limits)
    rows, weights = [], []
    for row, reply in enumerate(members):
        content = reply.content
        weight = None
        if problems[row] is None and not reply.has_error():
            array_names, metrics = _records_of(content)
            if (
                not array_names
                and len(metrics) == 1
                and metric_problem(content, node_limits[row], metrics) is None
            ):
                weight = _weight(metrics[0][1], plan)
        if weight is None:
            arrays = {name: array_of(values[row].copy()) for name, values in group.arrays.items()}
            content[ARRAYS] = array_record_of(arrays)
            continue
        content[SUMMED_KEY] = ConfigRecord()
        rows.append(row)
        weights.append(weight)
    return rows, weights


def _summable(
    request: Message, reply: Message, plan: SumPlan, limits: ReplyLimits | None
) -> float | None:
    """The reply's weight if it can be summed, else None."""
    if request.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return None
    array_names, metrics = _records_of(reply.content)
    if array_names != [plan.array_key] or len(metrics) != 1:
        return None
    reference = request.content.array_records.get(plan.array_key)
    if reference is None or reply_problem(reply, reference, plan.array_key, limits) is not None:
        return None
    return _weight(metrics[0][1], plan)


def _records_of(content: RecordDict) -> tuple[list[str], list[tuple[str, MetricRecord]]]:
    """The names of `content`'s ArrayRecords and its MetricRecords, in one pass: Flower's
    `array_records` and `metric_records` views are rebuilt, record by record, on every access."""
    records = list(content.items())
    array_names = [name for name, record in records if isinstance(record, ArrayRecord)]
    metrics = [(name, record) for name, record in records if isinstance(record, MetricRecord)]
    return array_names, metrics


def _weight(metrics: MetricRecord, plan: SumPlan) -> float | None:
    """The weight metric in `metrics`, if it is a number."""
    weight = metrics.get(plan.weight_key)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return None
    return weight


def is_stub(reply: Message) -> bool:
    """True for a reply whose arrays were summed on its actor."""
    if reply.has_error():
        return False
    content = reply.content  # not `config_records`: that view is rebuilt on every access
    return SUMMED_KEY in content and isinstance(content[SUMMED_KEY], ConfigRecord)


def combine(replies: Sequence[Message], sums: Sequence[ArraySum], plan: SumPlan) -> list[Message]:
    """On the driver: the replies a FedAvg-family strategy aggregates, with the stubs and the
    actors' `sums` replaced by one reply holding their weighted mean and, under the stubs' metric
    record name, the metrics Flower would have averaged from them (weight: their total weight).

    The strategy computes the same average from it: a single reply has weight factor 1.
    """
    stubs: list[Message] = []
    rest: list[Message] = []
    for reply in replies:
        (stubs if is_stub(reply) else rest).append(reply)
    if not stubs:
        return list(replies)
    total = ArraySum()
    for part in sums:
        total.merge(part)
    metric_name, records = _metric_records_of(stubs, plan.weight_key)
    metrics = average_metrics(records, plan.weight_key)
    metrics[plan.weight_key] = total.weight
    content = RecordDict({plan.array_key: total.mean(), metric_name: metrics})
    return [make_message(stubs[0].metadata, content), *rest]


def _metric_records_of(stubs: Sequence[Message], weight_key: str) -> tuple[str, list[MetricRecord]]:
    """The stubs' metric record name and records, checked as Flower's
    `validate_message_reply_consistency` checks replies before FedAvg averages them (same
    exception, same reasons): one MetricRecord each, the same keys, a single-number weight."""
    name, records = "", []
    for stub in stubs:
        found = [(key, r) for key, r in stub.content.items() if isinstance(r, MetricRecord)]
        if len(found) != 1:
            raise InconsistentMessageReplies(
                reason="Expected exactly one MetricRecord in replies, but found more. "
                "Skipping aggregation."
            )
        name = name or found[0][0]
        records.append(found[0][1])
    keys = set(records[0].keys())
    if any(set(record.keys()) != keys for record in records[1:]):
        raise InconsistentMessageReplies(
            reason="All MetricRecords must have the same keys for aggregation. "
            "This condition wasn't met. Skipping aggregation."
        )
    if weight_key not in keys:
        raise InconsistentMessageReplies(
            reason=f"Missing required key `{weight_key}` in the MetricRecord of reply messages. "
            "Cannot average ArrayRecords and MetricRecords. Skipping aggregation."
        )
    if any(isinstance(record[weight_key], list) for record in records):
        raise InconsistentMessageReplies(
            reason=f"Key `{weight_key}` in the MetricRecord of reply messages must be a single "
            "value (int or float), but a list was found. Skipping aggregation."
        )
    return name, records


def average_metrics(records: Sequence[MetricRecord], weight_key: str) -> MetricRecord:
    """Flower's `aggregate_metricrecords` on the records themselves, with the same arithmetic in
    the same order (so the same bits), summed in a plain dict: Flower's version re-validates the
    record on every addition, which cost more than the rest of a round's aggregation."""
    weights = [record[weight_key] for record in records]
    total_weight = sum(weights)
    factors = [w / total_weight for w in weights]
    out: dict[str, Any] = {}
    for record, factor in zip(records, factors, strict=True):
        for key, value in record.items():
            if key == weight_key:
                continue
            if key not in out:
                out[key] = (
                    [v * factor for v in value] if isinstance(value, list) else value * factor
                )
            elif isinstance(value, list):
                out[key] = [c + v * factor for c, v in zip(out[key], value, strict=True)]
            else:
                out[key] = out[key] + value * factor
    return MetricRecord(out)
