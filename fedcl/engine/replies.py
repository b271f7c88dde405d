"""Screening client train replies before a strategy sees them.

A reply is refused, with one line saying why, when its model record is missing, names other arrays
than the global model, holds an array of another shape or kind of dtype, holds NaN or infinity
(arrays or metrics), lacks the count the strategy weights by or gives a non-positive one, claims
more examples than the client holds in the round, or moves the model further from the global one
than `screen.max_update_norm` times the global model's norm. `reply_problem` judges one reply and
is pure, so that it can run where replies are made (in the actors) as well as on the driver;
`screen_replies` judges a round's replies on the driver and applies `screen.max_rejected`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common import MessageType
from flwr.common.constant import ErrorCode

from fedcl.engine.flower_compat import decoded, partition_of
from fedcl.npy import values_of
from fedcl.protocol import NUM_EXAMPLES

if TYPE_CHECKING:
    from fedcl.scenario.scenario import Scenario

logger = logging.getLogger(__name__)

INVALID = "invalid reply: "  # how a rejected reply's reason starts

# From this many elements per call, the actors sum and screen with compiled loops
# (`fedcl.engine.sum_kernels`): same bits, about ten times faster than numpy's passes. Smaller
# calls stay on numpy and spare the process numba's second of start-up.
COMPILED_FROM = 1 << 16
COMPILED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # what the loops are built for


def compiled_kernels(elements: int) -> ModuleType | None:
    """`fedcl.engine.sum_kernels` for a call on `elements` elements, if it pays and the loops
    could be built; else None (numpy). The loops take float32 and float64 arrays only."""
    return _load_kernels() if elements >= COMPILED_FROM else None


@functools.cache
def _load_kernels() -> ModuleType | None:
    """The compiled loops, or None (said once per process) where numba cannot build them: a
    platform without numba, no writable cache folder. numpy then gives the same results."""
    try:
        from fedcl.engine import sum_kernels
    except Exception as exc:  # numba fails in many ways; the numpy passes remain
        logger.warning("exact sums run on numpy, not compiled loops: %s", _first_line(str(exc)))
        return None
    return sum_kernels


@dataclass(frozen=True)
class ReplyLimits:
    """The bounds a train reply must respect beyond matching the global model's arrays.

    Attributes
    ----------
    max_update_norm : float | None (default: 10.0)
        Refuse a reply whose arrays lie further than this multiple of max(||global||,
        `norm_floor`) from the global arrays (L2 over the floating-point arrays of the model
        record). None: no bound.
    max_examples : int | None (default: None)
        The most examples the client can have trained on in the round (what it holds); a reply
        whose ``num-examples`` is larger is refused. None: not checked.
    weight_key : str | None (default: "num-examples")
        The metric the strategy weights replies by: it must be present and a positive number.
        None: no weight is required (``num-examples``, where present, must still be positive).
    norm_floor : float (default: 1.0)
        The least norm the update bound is relative to, so that a global model near zero does
        not make every update look huge.
    """

    max_update_norm: float | None = 10.0
    max_examples: int | None = None
    weight_key: str | None = NUM_EXAMPLES
    norm_floor: float = 1.0

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        max_examples: int | None = None,
        weight_key: str | None = NUM_EXAMPLES,
    ) -> ReplyLimits:
        """The limits `config`'s ``screen`` section sets (a resolved config, plain or OmegaConf);
        `max_examples` (what the client holds, see `examples_held`) is kept only if
        ``screen.check_examples`` is on."""
        screen = config["screen"]
        bound = screen["max_update_norm"]
        return cls(
            max_update_norm=None if bound is None else float(bound),
            max_examples=max_examples if screen["check_examples"] else None,
            weight_key=weight_key,
        )


def examples_held(scenario: Scenario, client: int, server_round: int, replay_size: int) -> int:
    """The most examples client `client` can train on in `server_round`: the samples it holds
    (its current task, blurry mix-in, deletions removed) plus a full replay buffer of
    `replay_size` (``train.replay_size``). Drifts only ever drop samples."""
    ids, _ = scenario.client_ids(client, server_round)
    return len(ids) + max(0, int(replay_size))


def reply_problem(
    reply: Message,
    reference: ArrayRecord,
    model_key: str,
    limits: ReplyLimits | None = None,
) -> str | None:
    """Why train `reply` cannot be aggregated against the global arrays `reference`, in one line,
    or None if it can (or if it is an error reply: errors are reported as they are).

    The record under `model_key` must hold the reference's array names, each of the same shape
    and of a dtype that casts to the reference's without changing kind (numpy's "same_kind": no
    complex, strings or floats where the reference holds integers). Every numeric array and
    metric must be finite. `limits` (default `ReplyLimits()`) bounds the weight metric,
    ``num-examples`` and the update's norm. The reply's arrays are replaced by decoded ones in
    place, so that the strategy does not decode them again; nothing else changes.
    """
    if reply.has_error():
        return None
    limits = limits or ReplyLimits()
    content = reply.content
    if model_key not in content.array_records:
        return f"no array record '{model_key}' (the model) in the reply"
    problem = _array_problem(content, reference, model_key)
    if problem is None:
        problem = metric_problem(content, limits)
    if problem is None and limits.max_update_norm is not None:
        record = content.array_records[model_key]
        problem = _norm_problem(record, reference, limits.max_update_norm, limits.norm_floor)
    return problem


def _array_problem(content: RecordDict, reference: ArrayRecord, model_key: str) -> str | None:
    record = content.array_records[model_key]
    missing = sorted(set(reference.keys()) - set(record.keys()))
    if missing:
        return f"arrays '{model_key}' lack {missing[:3]} of the global model"
    extra = sorted(set(record.keys()) - set(reference.keys()))
    if extra:
        return f"arrays '{model_key}' hold {extra[:3]}, which the global model has not"
    for key, arrays in content.array_records.items():
        for name, array in list(arrays.items()):
            try:
                held = decoded(array)  # decoded once, here and for the strategy
                if held is not array:
                    arrays[name] = held
                values = held.numpy()
            except Exception as exc:  # garbled bytes fail in many ways inside numpy
                return f"array '{key}/{name}' cannot be decoded ({type(exc).__name__})"
            if key == model_key:
                want = values_of(reference[name])
                if values.shape != want.shape:
                    return (
                        f"array '{name}' has shape {values.shape}, the global model has "
                        f"{want.shape}"
                    )
                # "same_kind": floats may change width, and integer buffers that an average
                # turned into floats (BatchNorm's counters) may come back as integers.
                if not np.can_cast(values.dtype, want.dtype, casting="same_kind"):
                    return (
                        f"array '{name}' has dtype {values.dtype}, the global model has "
                        f"{want.dtype}"
                    )
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return f"array '{key}/{name}' contains NaN or infinity"
    return None


def metric_problem(
    content: RecordDict,
    limits: ReplyLimits,
    records: list[tuple[str, MetricRecord]] | None = None,
) -> str | None:
    """`reply_problem`'s judgement of the metric records of a reply's `content`: finite metrics,
    the weight and ``num-examples`` within `limits`; None if they pass. `records`: the content's
    metric records, where the caller has them already."""
    if records is None:
        records = list(content.metric_records.items())  # a view built anew on every access
    for key, metrics in records:
        for name, value in metrics.items():
            if isinstance(value, int):
                continue
            finite = math.isfinite if isinstance(value, float) else _all_finite
            if not finite(value):
                return f"metric '{key}/{name}' is NaN or infinite"
    if limits.weight_key is not None and _metric(records, limits.weight_key) is None:
        return f"metric '{limits.weight_key}' (the strategy's weight) is missing"
    for name in dict.fromkeys([limits.weight_key, NUM_EXAMPLES]):
        value = _metric(records, name) if name is not None else None
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric '{name}' is a {type(value).__name__}, not a single number"
        if not value > 0:
            return f"metric '{name}' is {value:g}, not a positive count"
    examples, held = _metric(records, NUM_EXAMPLES), limits.max_examples
    if held is not None and isinstance(examples, int | float) and examples > held:
        return (
            f"metric '{NUM_EXAMPLES}' is {examples:g}, more than the {held} examples the client "
            "holds this round"
        )
    return None


def stacked_problems(
    arrays: Mapping[str, np.ndarray], reference: ArrayRecord, limits: Sequence[ReplyLimits]
) -> list[str | None]:
    """`reply_problem`'s judgement of the model arrays of several replies at once: row i of each
    (clients, *shape) array in `arrays` is reply i's, judged against `limits[i]`. None for a row
    whose arrays pass: the reference's names, shapes and dtype kinds, finite, within the update
    bound (computed for all rows together, so it may round differently from `reply_problem`'s
    right at the bound). A failing row's reason is short: `reply_problem` on the whole reply
    says it in full."""
    rows = len(limits)
    names = list(reference.keys())
    if list(arrays) != names:
        return [f"arrays {list(arrays)[:3]} are not the global model's {names[:3]}"] * rows
    problems: list[str | None] = [None] * rows
    distance = np.zeros(rows)
    floats: list[tuple[str, np.ndarray]] = []
    kernels = compiled_kernels(sum(values.size for values in arrays.values()))
    for name in names:
        want, values = values_of(reference[name]), arrays[name]
        same_kind = np.can_cast(values.dtype, want.dtype, casting="same_kind")
        if values.shape != (rows, *want.shape) or not same_kind:
            return [f"array '{name}' is not shaped like the global model's"] * rows
        if want.dtype.kind not in "fc":
            continue
        flat = values.reshape(rows, -1)
        if want.dtype.kind == "c":
            for row in np.flatnonzero(~np.isfinite(flat).all(axis=1)):
                problems[row] = problems[row] or f"array '{name}' contains NaN or infinity"
            continue
        if kernels is not None and flat.dtype in COMPILED_DTYPES and want.dtype == flat.dtype:
            kernels.squared_distances(flat, want.reshape(-1), distance)
        else:
            delta = flat - want.reshape(1, -1)
            distance += np.einsum("ki,ki->k", delta, delta)
        floats.append((name, flat))
    # A NaN or infinity anywhere in a row makes its distance non-finite: only those rows (and
    # rows so far away that the squares overflow) are searched for one, not the whole stack.
    for row in np.flatnonzero(~np.isfinite(distance)):
        for name, flat in floats:
            if problems[row] is None and not np.isfinite(flat[row]).all():
                problems[row] = f"array '{name}' contains NaN or infinity"
    norm = math.sqrt(_squared_norm(reference))
    for row, (limit, squared) in enumerate(zip(limits, distance, strict=True)):
        bound = limit.max_update_norm
        reach = None if bound is None else bound * max(norm, limit.norm_floor)
        too_far = reach is not None and not math.sqrt(squared) <= reach
        if problems[row] is None and too_far:
            problems[row] = "update norm exceeds screen.max_update_norm"
    return problems


def _all_finite(values: Any) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=float)).all())


def _metric(records: list[tuple[str, MetricRecord]], name: str) -> Any:
    """The value of metric `name` in the first of `records` holding it (None if none does)."""
    for _, metrics in records:
        if name in metrics:
            return metrics[name]
    return None


def _norm_problem(
    record: ArrayRecord, reference: ArrayRecord, bound: float, floor: float
) -> str | None:
    """Whether `record` lies further than `bound` x max(||reference||, `floor`) from `reference`
    (L2 over the floating-point arrays)."""
    scale = max(math.sqrt(_squared_norm(reference)), floor)
    distance = 0.0
    for name in reference:
        want = values_of(reference[name])
        if want.dtype.kind != "f":  # counters (e.g. BatchNorm's) are not weights
            continue
        # In the arrays' own precision, into a reused buffer: this runs for every reply. Huge
        # finite weights overflow to inf here, which is refused all the same.
        delta = _scratch(want.shape, np.result_type(want, record[name].numpy()))
        np.subtract(record[name].numpy(), want, out=delta)
        flat = delta.reshape(-1)
        distance += float(np.einsum("i,i->", flat, flat))
    if math.sqrt(distance) <= bound * scale:
        return None
    distance = _exact_distance(record, reference)  # for the message: float64, no overflow
    return (
        f"update norm {distance:.3g} exceeds screen.max_update_norm={bound:g} x the global "
        f"model's norm {scale:.3g}"
    )


def _exact_distance(record: ArrayRecord, reference: ArrayRecord) -> float:
    total = 0.0
    for name in reference:
        want = values_of(reference[name])
        if want.dtype.kind == "f":
            delta = (record[name].numpy().astype(np.float64) - want).reshape(-1)
            total += float(np.einsum("i,i->", delta, delta))
    return math.sqrt(total)


# The global model's squared norm, kept for the replies that follow (they share its Arrays).
_norm_cache: list[tuple[tuple[int, ...], list[Any], float]] = []
_buffers: dict[tuple[tuple[int, ...], np.dtype], np.ndarray] = {}


def _squared_norm(reference: ArrayRecord) -> float:
    arrays = list(reference.values())
    key = tuple(id(array) for array in arrays)
    if _norm_cache and _norm_cache[0][0] == key:
        return _norm_cache[0][2]
    total = 0.0
    for array in arrays:
        values = values_of(array)
        if values.dtype.kind == "f":
            flat = values.astype(np.float64).reshape(-1)
            total += float(np.einsum("i,i->", flat, flat))
    _norm_cache[:] = [(key, arrays, total)]  # the arrays are held so that no id is reused
    return total


def _scratch(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A reused buffer: a fresh one per reply costs a page fault per 4 KiB."""
    key = (shape, np.dtype(dtype))
    if key not in _buffers:
        _buffers[key] = np.empty(shape, dtype)
    return _buffers[key]


@dataclass
class Screened:
    """A round's replies after screening.

    Attributes
    ----------
    replies : list[Message]
        The replies, in order, each refused one replaced by a Flower error reply saying why.
    problems : list[tuple[int, str]]
        (node id, reason) for every reply that will not be aggregated: error replies, refused
        replies, and, past `max_rejected`, the round's good replies as well.
    rejected : int
        How many replies the screen refused (error replies not counted).
    discarded : str | None
        Set (the reason) when more than `max_rejected` replies were refused, so that every reply
        of the round was dropped.
    """

    replies: list[Message] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    rejected: int = 0
    discarded: str | None = None


def screen_replies(
    replies: list[Message],
    reference: ArrayRecord,
    model_key: str,
    limits: ReplyLimits | Callable[[int], ReplyLimits] | None = None,
    *,
    max_rejected: int | None = None,
    screened_before: Callable[[Message], bool] | None = None,
) -> Screened:
    """Judge each of a round's train `replies` with `reply_problem` (`limits`: the same for all, or
    a function of the node id) and replace each refused one by a Flower error reply.

    Replies to other messages than train ones (a strategy's own queries, which it judges itself)
    and replies for which `screened_before` is true (e.g. stubs of replies the actors judged with
    `reply_problem` and summed) pass unjudged. Each refusal is logged with the client and the
    reason. If more than `max_rejected` replies are refused (None: no limit), every other reply
    of the round is replaced by an error reply too, so that the strategy aggregates nothing: a
    round where that many clients sent garbage is not trusted.
    """
    screened = Screened()
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            screened.replies.append(reply)
            screened.problems.append((node, _first_line(reply.error.reason) or "error"))
            continue
        if reply.metadata.message_type != MessageType.TRAIN or (
            screened_before is not None and screened_before(reply)
        ):
            screened.replies.append(reply)
            continue
        node_limits = limits(node) if callable(limits) else limits
        problem = reply_problem(reply, reference, model_key, node_limits)
        if problem is None:
            screened.replies.append(reply)
            continue
        logger.info("client %d (node %d): %s%s", partition_of(node), node, INVALID, problem)
        screened.replies.append(_refused(reply, INVALID + problem))
        screened.problems.append((node, INVALID + problem))
        screened.rejected += 1
    if max_rejected is not None and screened.rejected > max_rejected:
        screened.discarded = (
            f"{screened.rejected} replies were invalid, more than screen.max_rejected="
            f"{max_rejected}"
        )
        reason = f"dropped: {screened.discarded}"
        for i, reply in enumerate(screened.replies):
            if not reply.has_error():
                screened.replies[i] = _refused(reply, reason)
                screened.problems.append((reply.metadata.src_node_id, reason))
    return screened


def _refused(reply: Message, reason: str) -> Message:
    error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
    return make_message(reply.metadata, error=error)


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def limits_per_node(
    config: Mapping[str, Any], scenario: Scenario, server_round: int, weight_key: str | None
) -> Callable[[int], ReplyLimits]:
    """For each node id, the `ReplyLimits` of its train reply in `server_round`: `config`'s
    ``screen`` bounds and, with ``screen.check_examples``, what the client holds."""
    base = ReplyLimits.from_config(config, weight_key=weight_key)
    if not config["screen"]["check_examples"]:
        return lambda node: base
    replay_size = config["train"]["replay_size"]

    def of(node: int) -> ReplyLimits:
        held = examples_held(scenario, partition_of(node), server_round, replay_size)
        return dataclasses.replace(base, max_examples=held)

    return of
