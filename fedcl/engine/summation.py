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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message.message import make_message
from flwr.common import MessageType
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedYogi
from flwr.serverapp.strategy.strategy_utils import (
    aggregate_metricrecords,
    validate_message_reply_consistency,
)

from fedcl.engine.replies import ReplyLimits, reply_problem
from fedcl.npy import array_of, array_record_of, values_of

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
        for name, array in arrays.items():
            values = values_of(array)
            self._start(name, values.shape, values.dtype)
            term = self._scratch_of(name).term
            # In float64 (not numpy's float32 x scalar): exact for integer weights below 2**29.
            np.multiply(values, weight, out=term, dtype=np.float64)
            self._accumulate(name, term)
        self.weight += weight
        self.count += 1

    def merge(self, other: ArraySum) -> None:
        """Add everything `other` holds."""
        for name in other.high:
            self._start(name, other.high[name].shape, other.dtypes[name])
            self._accumulate(name, other.high[name])
            self._accumulate(name, other.low[name])
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
) -> tuple[list[Message], ArraySum]:
    """On an actor: sum the train replies that FedAvg would aggregate and replace each by a stub.

    A reply is summed only if it is a train reply without error that passes the driver's screen
    (`reply_problem` with `limits` of its node: the request's array names and shapes, finite
    values, a valid `plan.weight_key`, the update bound) and holds exactly one ArrayRecord and
    one MetricRecord; any other reply goes to the driver whole, to be screened and aggregated (or
    refused by the strategy) there exactly as without summing.
    """
    total = ArraySum()
    out = []
    for request, reply in zip(requests, replies, strict=True):
        node_limits = limits(reply.metadata.src_node_id) if limits is not None else None
        summable = _summable(request, reply, plan, node_limits)
        if summable is None:
            out.append(reply)
            continue
        total.add(reply.content.array_records[plan.array_key], summable)
        stub = RecordDict({SUMMED_KEY: ConfigRecord()})
        for name, record in reply.content.items():
            if name != plan.array_key:
                stub[name] = record
        out.append(make_message(reply.metadata, stub))
    return out, total


def _summable(
    request: Message, reply: Message, plan: SumPlan, limits: ReplyLimits | None
) -> float | None:
    """The reply's weight if it can be summed, else None."""
    if request.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return None
    content = reply.content
    if list(content.array_records) != [plan.array_key] or len(content.metric_records) != 1:
        return None
    reference = request.content.array_records.get(plan.array_key)
    if reference is None or reply_problem(reply, reference, plan.array_key, limits) is not None:
        return None
    weight = next(iter(content.metric_records.values())).get(plan.weight_key)
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return None
    return weight


def is_stub(reply: Message) -> bool:
    """True for a reply whose arrays were summed on its actor."""
    return not reply.has_error() and SUMMED_KEY in reply.content.config_records


def combine(replies: Sequence[Message], sums: Sequence[ArraySum], plan: SumPlan) -> list[Message]:
    """On the driver: the replies a FedAvg-family strategy aggregates, with the stubs and the
    actors' `sums` replaced by one reply holding their weighted mean and, under the stubs' metric
    record name, the metrics Flower would have averaged from them (weight: their total weight).

    The strategy computes the same average from it: a single reply has weight factor 1.
    """
    stubs = [reply for reply in replies if is_stub(reply)]
    rest = [reply for reply in replies if not is_stub(reply)]
    if not stubs:
        return rest
    total = ArraySum()
    for part in sums:
        total.merge(part)
    contents = [stub.content for stub in stubs]
    metric_name = next(iter(contents[0].metric_records))
    # As FedAvg does before averaging: every client's metrics have the same keys and the weight.
    validate_message_reply_consistency(contents, plan.weight_key, check_arrayrecord=False)
    metrics = aggregate_metricrecords(contents, plan.weight_key)
    metrics[plan.weight_key] = total.weight
    content = RecordDict({plan.array_key: total.mean(), metric_name: metrics})
    return [make_message(stubs[0].metadata, content), *rest]
