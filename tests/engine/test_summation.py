"""Summing FedAvg-family updates on the actors: the sums are exact (the same bits in any grouping,
the correctly rounded mean), the strategy aggregates the same model as from every reply, and only
strategies that average linearly are summed."""

from __future__ import annotations

import sys
from fractions import Fraction

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from hypothesis import given, settings
from hypothesis import strategies as st

import fedcl
import fedcl.engine.replies as replies_module
from fedcl.client.app import StackedArrays
from fedcl.engine.flower_compat import set_server_identity
from fedcl.engine.replies import ReplyLimits, screen_replies, stacked_problems
from fedcl.engine.summation import (
    ArraySum,
    average_metrics,
    combine,
    is_stub,
    sum_plan,
    sum_replies,
)
from fedcl.npy import array_of
from fedcl.strategies.fot.strategy import FOT
from tests.engine.runs import read_jsonl


def _adversarial_round(count: int, seed: int) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Per client, float32 arrays and an integer weight whose weighted sums round differently in
    every grouping: magnitudes from 1e-9 to 1e3, and a last client that nearly cancels the others,
    so that the mean is tiny next to the terms."""
    rng = np.random.default_rng(seed)
    weights = [int(w) for w in rng.integers(1, 500, size=count)]
    clients = []
    for _ in range(count - 1):
        scale = 10.0 ** rng.integers(-9, 4, size=(64,))
        values = (rng.standard_normal((64,)) * scale).astype(np.float32)
        clients.append({"w": values, "b": rng.standard_normal((3,)).astype(np.float32)})
    partial = sum(c["w"].astype(np.float64) * w for c, w in zip(clients, weights, strict=False))
    last = (-partial / weights[-1]).astype(np.float32)
    clients.append({"w": last, "b": rng.standard_normal((3,)).astype(np.float32)})
    return clients, weights


@pytest.fixture(params=["numpy", "compiled"])
def summing(request, monkeypatch):
    """Runs a test twice: with numpy's passes, and with the compiled loops taking any size
    (`fedcl.engine.sum_kernels`; they take models from `COMPILED_FROM` elements in a run)."""
    monkeypatch.setattr(
        replies_module, "COMPILED_FROM", 0 if request.param == "compiled" else 1 << 62
    )
    return request.param


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: array_of(values) for name, values in arrays.items()})


def _summed(clients, weights, groups: list[list[int]]) -> ArrayRecord:
    parts = []
    for group in groups:
        part = ArraySum()
        for i in group:
            part.add(_record(clients[i]), weights[i])
        parts.append(part)
    total = ArraySum()
    for part in parts:
        total.merge(part)
    return total.mean()


@pytest.mark.usefixtures("summing")
def test_the_mean_has_the_same_bits_in_any_grouping_and_is_correctly_rounded():
    clients, weights = _adversarial_round(12, seed=0)
    groupings = [
        [list(range(12))],
        [list(range(0, 12, 2)), list(range(1, 12, 2))],
        [[11, 3, 7], [0, 5], [1, 2, 4, 6, 8, 9, 10]],
        [[i] for i in reversed(range(12))],
    ]
    means = [_summed(clients, weights, g) for g in groupings]
    for name in ("w", "b"):
        for other in means[1:]:
            assert means[0][name].numpy().tobytes() == other[name].numpy().tobytes()
        # The exact rational mean, rounded once to float32.
        exact = [
            sum(Fraction(float(c[name][k])) * w for c, w in zip(clients, weights, strict=True))
            / sum(weights)
            for k in range(len(clients[0][name]))
        ]
        want = np.array([float(v) for v in exact]).astype(np.float32)
        np.testing.assert_array_equal(means[0][name].numpy(), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_loops_sum_to_numpys_bits(monkeypatch, dtype):
    """A run sums small models with numpy and large ones with the compiled loops, and 1 or 2
    actors split a round's clients into calls of different sizes: both must give the same bits,
    whole replies, stacked rows and merged sums alike, in any row order."""
    clients, weights = _adversarial_round(12, seed=1)
    clients = [{name: values.astype(dtype) for name, values in c.items()} for c in clients]
    stack = {name: np.stack([c[name] for c in clients[1:]]) for name in clients[0]}
    rows = [3, 0, 10, 7, 1, 2, 9, 4, 8, 5, 6]

    def summed(threshold: int) -> ArraySum:
        monkeypatch.setattr(replies_module, "COMPILED_FROM", threshold)
        total, part = ArraySum(), ArraySum()
        total.add(_record(clients[0]), weights[0])
        part.add_rows(stack, rows, [weights[1 + row] for row in rows])
        total.merge(part)  # as the driver adds the actors' sums
        return total

    with_numpy, compiled = summed(1 << 62), summed(0)
    for name in clients[0]:
        assert compiled.high[name].tobytes() == with_numpy.high[name].tobytes()
        assert compiled.low[name].tobytes() == with_numpy.low[name].tobytes()
    assert (compiled.weight, compiled.count) == (with_numpy.weight, with_numpy.count)


def test_without_the_compiled_loops_sums_run_on_numpy_and_say_so(monkeypatch, caplog):
    import fedcl.engine

    replies_module._load_kernels.cache_clear()
    monkeypatch.delattr(fedcl.engine, "sum_kernels", raising=False)
    monkeypatch.setitem(sys.modules, "fedcl.engine.sum_kernels", None)  # importing it fails
    try:
        assert replies_module.compiled_kernels(1 << 40) is None
        assert "exact sums run on numpy" in caplog.text
        clients, weights = _adversarial_round(4, seed=2)
        assert _summed(clients, weights, [[0, 1], [2, 3]])["w"].numpy().tobytes() == (
            _summed(clients, weights, [[3, 2, 1, 0]])["w"].numpy().tobytes()
        )
    finally:
        replies_module._load_kernels.cache_clear()


def test_a_plain_float64_sum_would_depend_on_the_grouping():
    """The property above is not free: the same data summed plainly differs between groupings
    (so the test above can tell an exact sum from a plain one)."""
    clients, weights = _adversarial_round(12, seed=0)

    def plain(groups):
        parts = [sum(clients[i]["w"].astype(np.float64) * weights[i] for i in g) for g in groups]
        return (sum(parts) / sum(weights)).astype(np.float32)

    one = plain([list(range(12))])
    split = plain([[11, 3, 7], [0, 5], [1, 2, 4, 6, 8, 9, 10]])
    assert one.tobytes() != split.tobytes()


def _train_request(node: int, arrays: ArrayRecord) -> Message:
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"lr": 0.1})})
    return Message(content, node, MessageType.TRAIN, group_id="1")


def _train_reply(request: Message, arrays: dict[str, np.ndarray], examples: int) -> Message:
    metrics = MetricRecord({"num-examples": examples, "train-loss": examples / 7.0})
    audit = ConfigRecord({"ids": b"\x00"})
    content = RecordDict({"arrays": _record(arrays), "metrics": metrics, "audit": audit})
    return Message(content, reply_to=request)


@pytest.fixture
def round_of_replies():
    set_server_identity(5)
    rng = np.random.default_rng(3)
    reference = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    requests = [_train_request(1000 + n, _record(reference)) for n in range(7)]
    replies = []
    for n, request in enumerate(requests):
        arrays = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in reference.items()}
        replies.append(_train_reply(request, arrays, examples=10 + 3 * n))
    return requests, replies


def test_a_strategy_aggregates_the_same_model_from_the_actors_sums(round_of_replies):
    requests, replies = round_of_replies
    strategy = FedAvg()
    plan = sum_plan(strategy)
    assert plan is not None
    want_arrays, want_metrics = strategy.aggregate_train(1, replies)

    # Two actors, each summing its own clients; the driver combines their stubs and sums.
    first, first_sum = sum_replies(requests[:3], replies[:3], plan)
    second, second_sum = sum_replies(requests[3:], replies[3:], plan)
    stubs = first + second
    assert all(is_stub(s) and "arrays" not in s.content.array_records for s in stubs)
    assert all("audit" in s.content.config_records for s in stubs)  # the audit still travels
    combined = combine(stubs, [first_sum, second_sum], plan)
    assert len(combined) == 1
    got_arrays, got_metrics = strategy.aggregate_train(1, combined)

    for name in want_arrays:
        np.testing.assert_allclose(got_arrays[name].numpy(), want_arrays[name].numpy(), rtol=1e-6)
    # Metrics are averaged by Flower's own function over the same per-client records.
    assert dict(got_metrics) == dict(want_metrics)


@pytest.mark.usefixtures("summing")
def test_replies_that_cannot_be_summed_reach_the_driver_whole(round_of_replies):
    requests, replies = round_of_replies
    plan = sum_plan(FedAvg())
    bad = replies[2].content["arrays"]
    bad["w"] = array_of(np.full((4, 3), np.nan, np.float32))
    replies[4].content["arrays"]["b"] = array_of(np.zeros(5, np.float32))  # wrong shape
    out, total = sum_replies(requests, replies, plan)
    assert [is_stub(r) for r in out] == [True, True, False, True, False, True, True]
    assert total.count == 5
    assert total.weight == sum(10 + 3 * n for n in (0, 1, 3, 5, 6))
    # The driver's screen sees them as before (not summed, arrays intact).
    assert "arrays" in out[2].content.array_records


def _stacked(replies: list[Message], rows: list[int]) -> StackedArrays:
    """The replies' model arrays moved into one stacked group, as vectorized training leaves
    them."""
    records = [replies[i].content.array_records["arrays"] for i in rows]
    arrays = {name: np.stack([r[name].numpy() for r in records]) for name in records[0]}
    for i in rows:
        del replies[i].content["arrays"]
    return StackedArrays(rows, arrays)


@pytest.mark.usefixtures("summing")
def test_stacked_replies_sum_to_the_same_bits_as_whole_replies(round_of_replies):
    requests, replies = round_of_replies
    plan = sum_plan(FedAvg())
    _, whole = sum_replies(requests, replies, plan)
    # The same round with clients 1, 2, 4 and 6 trained together, their arrays left stacked.
    group = _stacked(replies, [1, 2, 4, 6])
    out, stacked = sum_replies(requests, replies, plan, stacked=[group])
    assert all(is_stub(r) for r in out)
    assert (stacked.count, stacked.weight) == (whole.count, whole.weight)
    for name in ("w", "b"):
        assert stacked.mean()[name].numpy().tobytes() == whole.mean()[name].numpy().tobytes()


@pytest.mark.usefixtures("summing")
def test_stacked_replies_that_fail_the_screen_reach_the_driver_whole(round_of_replies):
    requests, replies = round_of_replies
    plan = sum_plan(FedAvg())
    replies[2].content["arrays"]["w"] = array_of(np.full((4, 3), np.nan, np.float32))
    replies[5].content["arrays"]["b"] = array_of(np.full(3, 1e6, np.float32))  # too far
    kept = replies[3].content["arrays"]["w"].numpy().copy()
    group = _stacked(replies, [2, 3, 5])

    def limits(node: int) -> ReplyLimits:  # NaN is caught without the norm bound too
        return ReplyLimits(max_update_norm=None if node == 1002 else 10.0)

    out, total = sum_replies(requests, replies, plan, limits, stacked=[group])
    assert [is_stub(r) for r in out] == [True, True, False, True, True, False, True]
    assert total.weight == sum(10 + 3 * n for n in (0, 1, 3, 4, 6))
    # The refused ones carry their arrays again, for the driver's screen to say why.
    reference = requests[0].content["arrays"]
    screened = screen_replies(out, reference, "arrays", ReplyLimits(), screened_before=is_stub)
    assert [node for node, _ in screened.problems] == [1002, 1005]
    assert "NaN" in screened.problems[0][1] and "update norm" in screened.problems[1][1]
    assert "arrays" not in out[3].content.array_records
    assert np.array_equal(group.arrays["w"][1], kept)


@pytest.mark.usefixtures("summing")
def test_the_stacked_screen_measures_each_rows_distance_from_the_global_model():
    reference = {"w": np.full((40, 30), 2.0, np.float32), "b": np.full(30, -1.0, np.float32)}
    norm = float(np.sqrt(sum(np.square(v, dtype=np.float64).sum() for v in reference.values())))
    rng = np.random.default_rng(4)

    def row_at(distance: float) -> dict[str, np.ndarray]:
        step = {name: rng.standard_normal(v.shape) for name, v in reference.items()}
        length = np.sqrt(sum(np.square(v).sum() for v in step.values()))
        return {n: (reference[n] + step[n] * distance / length).astype(np.float32) for n in step}

    rows = [row_at(0.45 * norm), row_at(0.55 * norm), row_at(0.1 * norm), row_at(0.0)]
    rows[2]["w"][3, 4] = np.nan
    rows[3]["b"][7] = np.inf
    stack = {name: np.stack([row[name] for row in rows]) for name in reference}
    problems = stacked_problems(stack, _record(reference), [ReplyLimits(max_update_norm=0.5)] * 4)
    assert problems[0] is None
    assert problems[1] == "update norm exceeds screen.max_update_norm"
    assert problems[2] == "array 'w' contains NaN or infinity"
    assert problems[3] == "array 'b' contains NaN or infinity"


@pytest.mark.usefixtures("summing")
def test_stacked_replies_carrying_other_arrays_reach_the_driver_whole(round_of_replies):
    """A reply with arrays besides the stacked model (a strategy's train extra) is not summed:
    its extra arrays reach the strategy, its model goes back under `arrays`."""
    requests, replies = round_of_replies
    plan = sum_plan(FedAvg())
    model = replies[2].content["arrays"]["w"].numpy().copy()
    group = _stacked(replies, [1, 2, 4])
    replies[2].content["extra"] = _record({"fisher": np.ones(3, np.float32)})
    out, total = sum_replies(requests, replies, plan, stacked=[group])
    assert [is_stub(r) for r in out] == [True, True, False, True, True, True, True]
    assert total.count == 6
    assert np.array_equal(out[2].content["arrays"]["w"].numpy(), model)
    assert np.array_equal(out[2].content["extra"]["fisher"].numpy(), np.ones(3, np.float32))


metric_values = st.floats(-1e6, 1e6, allow_nan=False) | st.integers(-1000, 1000)


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 10_000),
            st.lists(metric_values, min_size=3, max_size=3),
            st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=2),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_metric_averages_have_the_bits_of_flowers_own(clients):
    records = [
        MetricRecord({"num-examples": n, "a": a, "loss": b, "c": c, "hist": hist})
        for n, (a, b, c), hist in clients
    ]
    want = aggregate_metricrecords([RecordDict({"m": r}) for r in records], "num-examples")
    got = average_metrics(records, "num-examples")
    assert list(got.items()) == list(want.items())


def test_stub_metrics_are_checked_as_flower_checks_replies(round_of_replies):
    requests, replies = round_of_replies
    plan = sum_plan(FedAvg())
    stubs, total = sum_replies(requests, replies, plan)
    del stubs[3].content["metrics"]["train-loss"]
    with pytest.raises(InconsistentMessageReplies, match="same keys"):
        combine(stubs, [total], plan)


class _OwnAggregate(FedAvg):
    def aggregate_train(self, server_round, replies):
        return super().aggregate_train(server_round, list(replies)[:1])


@pytest.mark.parametrize(
    ("strategy", "summed"),
    [
        (FedAvg(), True),
        (FedProx(proximal_mu=0.1), True),
        (FedAvgM(server_momentum=0.9), True),
        (FedAdam(), True),
        (FedAvg(train_metrics_aggr_fn=lambda records, key: MetricRecord()), False),
        (_OwnAggregate(), False),
        (FedMedian(), False),
        (FedTrimmedAvg(), False),
        (FOT(), False),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, bool) else str(v),
)
def test_only_linear_fedavg_family_aggregation_is_summed(strategy, summed):
    assert (sum_plan(strategy) is not None) is summed


RUN = [
    "dataset.name=digits",
    "scenario.num_tasks=1",
    "clients.num=8",
    "rounds=3",
    "train.batch_size=16",
    "strategy.name=fedavg",
    "strategy.fraction_train=0.75",
    "log.progress=false",
]


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("vectorize", ["off", "on"])
def test_runs_summed_on_actors_match_unsummed_runs_and_any_actor_count(tmp_path, vectorize):
    # Summed, the default ClientApp's weights never enter the replies: they are kept stacked
    # (trained one by one, or vectorized) and summed from there; unsummed, every reply has them.
    runs = {}
    for name, extra in {
        "summed-2": ["engine.num_actors=2"],
        "summed-1": ["engine.num_actors=1"],
        "unsummed-2": ["engine.num_actors=2", "engine.sum_on_actors=false"],
    }.items():
        overrides = [*RUN, *extra, f"engine.vectorize={vectorize}"]
        result = fedcl.run(None, overrides, out=tmp_path / name)
        runs[name] = (result, read_jsonl(tmp_path / name / "metrics.jsonl"))
    summed, unsummed = runs["summed-2"], runs["unsummed-2"]
    assert [r["summed_on_actors"] for r in summed[1]] == [6, 6, 6]
    assert [r["summed_on_actors"] for r in unsummed[1]] == [0, 0, 0]
    # The same bits with one actor or two: the sums are exact.
    one = runs["summed-1"][0].arrays
    for name in one:
        assert one[name].numpy().tobytes() == summed[0].arrays[name].numpy().tobytes()
    # Flower's float32 loop and the exact sums agree to float32 rounding (a few rounds' worth).
    for name in one:
        np.testing.assert_allclose(
            summed[0].arrays[name].numpy(), unsummed[0].arrays[name].numpy(), atol=1e-5
        )
    for mine, flowers in zip(summed[1], unsummed[1], strict=True):
        assert mine["train"]["train-loss"] == pytest.approx(flowers["train"]["train-loss"], 1e-4)
