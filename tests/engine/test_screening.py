"""Reply screening: every class of bad train reply is refused with its reason, the round goes on
with the others aggregated, and `screen.max_rejected` drops a round with too many bad replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

import fedcl
from fedcl.client import app as default
from fedcl.config import load_config
from fedcl.engine.audit import DeletionAudit
from fedcl.engine.flower_compat import assign_message_id, error_reply, set_server_identity
from fedcl.engine.loop import TrainStep, _train_step
from fedcl.engine.replies import (
    ReplyLimits,
    examples_held,
    limits_per_node,
    reply_problem,
    screen_replies,
)
from fedcl.errors import ConfigError
from fedcl.testing import InProcessGrid
from tests.engine.runs import read_jsonl

# --- one reply at a time ----------------------------------------------------------------------

RNG = np.random.default_rng(0)
REFERENCE = {
    "w": RNG.normal(size=(4, 3)).astype(np.float32),
    "b": np.zeros(3, dtype=np.float32),
    "steps": np.array(7, dtype=np.int64),  # an integer buffer, as BatchNorm's counter
}
HELD = 50


def message(node: int = 1003) -> Message:
    set_server_identity(run_id=5)
    request = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN, group_id="1")
    assign_message_id(request)
    return request


def train_reply(arrays=None, metrics=None, *, node: int = 1003, key: str = "arrays") -> Message:
    """A train reply from `node`: `arrays` (default: the reference plus a small step) and
    `metrics` (default: num-examples = HELD)."""
    if arrays is None:
        arrays = {
            name: value + (0.01 if value.dtype.kind == "f" else 1)
            for name, value in REFERENCE.items()
        }
    metrics = {"num-examples": HELD, "train-loss": 0.5} if metrics is None else metrics
    content = RecordDict(
        {
            key: ArrayRecord({name: Array(np.asarray(v)) for name, v in arrays.items()}),
            "metrics": MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=message(node))


def reference() -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in REFERENCE.items()})


def changed(name: str, value) -> dict[str, np.ndarray]:
    arrays = {n: v.copy() for n, v in REFERENCE.items()}
    arrays[name] = np.asarray(value)
    return arrays


def without(name: str) -> dict[str, np.ndarray]:
    return {n: v for n, v in REFERENCE.items() if n != name}


def scaled_update(factor: float) -> dict[str, np.ndarray]:
    """The reference moved by `factor` x its own float norm (a direction along the ones)."""
    size = np.sqrt(
        sum(
            float(np.sum(v.astype(np.float64) ** 2))
            for v in REFERENCE.values()
            if v.dtype.kind == "f"
        )
    )
    count = sum(v.size for v in REFERENCE.values() if v.dtype.kind == "f")
    step = factor * size / np.sqrt(count)
    return {
        n: (v + step).astype(v.dtype) if v.dtype.kind == "f" else v for n, v in REFERENCE.items()
    }


LIMITS = ReplyLimits(max_update_norm=10.0, max_examples=HELD)

BAD_REPLIES = [
    (
        "NaN",
        lambda: train_reply(changed("w", np.full((4, 3), np.nan, np.float32))),
        "array 'arrays/w' contains NaN or infinity",
    ),
    (
        "+inf",
        lambda: train_reply(changed("b", np.array([0, np.inf, 0], np.float32))),
        "array 'arrays/b' contains NaN or infinity",
    ),
    (
        "-inf",
        lambda: train_reply(changed("b", np.array([0, -np.inf, 0], np.float32))),
        "array 'arrays/b' contains NaN or infinity",
    ),
    (
        "wrong shape",
        lambda: train_reply(changed("w", np.zeros((4, 2), np.float32))),
        "array 'w' has shape (4, 2), the global model has (4, 3)",
    ),
    (
        "transposed",
        lambda: train_reply(changed("w", np.zeros((3, 4), np.float32))),
        "array 'w' has shape (3, 4)",
    ),
    (
        "complex dtype",
        lambda: train_reply(changed("w", np.zeros((4, 3), np.complex64))),
        "array 'w' has dtype complex64, the global model has float32",
    ),
    (
        "float for int",
        lambda: train_reply(changed("steps", np.array(7.5))),
        "array 'steps' has dtype float64, the global model has int64",
    ),
    (
        "string dtype",
        lambda: train_reply(changed("b", np.array(["a", "b", "c"]))),
        "array 'b' has dtype <U1, the global model has float32",
    ),
    (
        "missing array",
        lambda: train_reply(without("b")),
        "arrays 'arrays' lack ['b'] of the global model",
    ),
    (
        "extra array",
        lambda: train_reply({**REFERENCE, "x": np.zeros(2, np.float32)}),
        "arrays 'arrays' hold ['x'], which the global model has not",
    ),
    (
        "no model record",
        lambda: train_reply(key="weights"),
        "no array record 'arrays' (the model) in the reply",
    ),
    (
        "no count",
        lambda: train_reply(metrics={"train-loss": 0.5}),
        "metric 'num-examples' (the strategy's weight) is missing",
    ),
    (
        "zero count",
        lambda: train_reply(metrics={"num-examples": 0}),
        "metric 'num-examples' is 0, not a positive count",
    ),
    (
        "negative count",
        lambda: train_reply(metrics={"num-examples": -1000}),
        "metric 'num-examples' is -1000, not a positive count",
    ),
    (
        "list count",
        lambda: train_reply(metrics={"num-examples": [3, 4]}),
        "metric 'num-examples' is a list, not a single number",
    ),
    (
        "count > held",
        lambda: train_reply(metrics={"num-examples": HELD + 1}),
        f"metric 'num-examples' is {HELD + 1}, more than the {HELD} examples the client holds",
    ),
    (
        "NaN metric",
        lambda: train_reply(metrics={"num-examples": HELD, "train-loss": float("nan")}),
        "metric 'metrics/train-loss' is NaN or infinite",
    ),
    (
        "finite 1e30",
        lambda: train_reply(changed("w", np.full((4, 3), 1e30, np.float32))),
        "update norm 3.46e+30 exceeds screen.max_update_norm=10",
    ),
    ("just over the bound", lambda: train_reply(scaled_update(10.01)), "update norm"),
    ("garbled bytes", lambda: garbled(), "array 'arrays/w' cannot be decoded (ValueError)"),
]


def garbled() -> Message:
    reply = train_reply()
    junk = Array(dtype="float32", shape=(4, 3), stype="numpy.ndarray", data=b"junk")
    reply.content["arrays"]["w"] = junk
    return reply


@pytest.mark.parametrize(("case", "make", "reason"), BAD_REPLIES, ids=[c[0] for c in BAD_REPLIES])
def test_each_class_of_bad_reply_is_refused_with_its_reason(case, make, reason):
    assert reason in reply_problem(make(), reference(), "arrays", LIMITS)


GOOD_REPLIES = [
    ("a small step", lambda: train_reply()),
    ("count == held", lambda: train_reply(metrics={"num-examples": HELD})),
    ("float64 for float32", lambda: train_reply(changed("w", REFERENCE["w"].astype(np.float64)))),
    ("int32 for int64", lambda: train_reply(changed("steps", np.array(9, np.int32)))),
    ("just under the bound", lambda: train_reply(scaled_update(9.99))),
    ("extra metric record", lambda: train_reply(metrics={"num-examples": 1, "acc": 0.3})),
]


@pytest.mark.parametrize(("case", "make"), GOOD_REPLIES, ids=[c[0] for c in GOOD_REPLIES])
def test_good_replies_pass(case, make):
    assert reply_problem(make(), reference(), "arrays", LIMITS) is None


def test_replies_to_a_strategys_own_queries_are_left_to_it():
    query = Message(RecordDict({"metrics": MetricRecord({"x": 1})}), reply_to=message())
    query.metadata.message_type = "query.prototypes"
    screened = screen_replies([query], reference(), "arrays", LIMITS)
    assert screened.replies == [query] and screened.problems == []
    assert reply_problem(query, reference(), "arrays", LIMITS) is not None  # as a train reply


def test_error_replies_are_not_judged_here():
    assert reply_problem(error_reply(message(), "boom"), reference(), "arrays", LIMITS) is None


def test_the_norm_bound_is_relative_to_a_floor_for_a_model_near_zero():
    zero = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    step = train_reply({"w": np.full(4, 4.0, np.float32)})  # norm 8 <= 10 x max(0, 1)
    assert reply_problem(step, zero, "arrays", LIMITS) is None
    leap = train_reply({"w": np.full(4, 6.0, np.float32)})  # norm 12 > 10
    assert "update norm 12 exceeds" in reply_problem(leap, zero, "arrays", LIMITS)


def test_limits_come_from_the_screen_section_and_can_be_turned_off():
    cfg = load_config(None, ["screen.max_update_norm=2.5"])
    assert ReplyLimits.from_config(cfg, max_examples=9) == ReplyLimits(2.5, 9)
    off = load_config(None, ["screen.max_update_norm=null", "screen.check_examples=false"])
    limits = ReplyLimits.from_config(off, max_examples=9)
    assert limits == ReplyLimits(max_update_norm=None, max_examples=None)
    assert ReplyLimits.from_config(off, weight_key="steps").weight_key == "steps"
    huge = train_reply(changed("w", np.full((4, 3), 1e30, np.float32)), {"num-examples": 10**6})
    assert reply_problem(huge, reference(), "arrays", limits) is None
    assert reply_problem(huge, reference(), "arrays", LIMITS) is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("screen.max_update_norm=0", "screen.max_update_norm must be > 0 or null, got 0"),
        ("screen.max_update_norm=-1", "screen.max_update_norm must be > 0 or null"),
        ("screen.max_rejected=-1", "screen.max_rejected must be >= 0 or null, got -1"),
        ("screen.max_rejected=1.5", "bad value for config key 'screen.max_rejected'"),
        ("screen.check_examples=maybe", "bad value for config key 'screen.check_examples'"),
    ],
)
def test_bad_screen_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


# --- a round's replies ------------------------------------------------------------------------


def test_screen_replies_lists_errors_and_refusals_and_keeps_the_rest():
    replies = [
        train_reply(node=1000),
        train_reply(metrics={"num-examples": -1000}, node=1001),
        error_reply(message(1002), "RuntimeError: boom\nTraceback ..."),
        train_reply(node=1003),
    ]
    screened = screen_replies(replies, reference(), "arrays", LIMITS)
    assert [r.has_error() for r in screened.replies] == [False, True, True, False]
    assert screened.problems == [
        (1001, "invalid reply: metric 'num-examples' is -1000, not a positive count"),
        (1002, "RuntimeError: boom"),
    ]
    assert screened.replies[1].error.reason == screened.problems[0][1]
    assert (screened.rejected, screened.discarded) == (1, None)
    assert screened.replies[0] is replies[0]


@pytest.mark.parametrize(
    ("tolerated", "dropped"), [(None, False), (2, False), (1, True), (0, True)]
)
def test_a_round_with_more_refusals_than_tolerated_is_dropped_whole(tolerated, dropped):
    replies = [
        train_reply(node=1000),
        train_reply(changed("w", np.full((4, 3), 1e30, np.float32)), node=1001),
        train_reply(changed("w", np.full((4, 3), np.nan, np.float32)), node=1002),
    ]
    screened = screen_replies(replies, reference(), "arrays", LIMITS, max_rejected=tolerated)
    assert screened.rejected == 2
    assert screened.replies[0].has_error() == dropped
    nodes = sorted(node for node, _ in screened.problems)
    if dropped:
        assert (
            screened.discarded
            == f"2 replies were invalid, more than screen.max_rejected={tolerated}"
        )
        assert nodes == [1000, 1001, 1002]
        assert (1000, f"dropped: {screened.discarded}") in screened.problems
    else:
        assert screened.discarded is None
        assert nodes == [1001, 1002]


def test_per_node_limits_hold_what_each_client_holds_this_round():
    grid = InProcessGrid(
        ["clients.num=4", "rounds=4", "scenario.num_tasks=2", "train.replay_size=5"]
    )
    try:
        limits = limits_per_node(grid.cfg, grid.scenario, 3, "num-examples")
        for client in range(4):
            held = len(grid.scenario.client_ids(client, 3)[0])
            assert held > 0
            assert limits(1000 + client) == ReplyLimits(10.0, held + 5)
            assert examples_held(grid.scenario, client, 3, 5) == held + 5
    finally:
        grid.close()


# --- a whole round: a ClientApp whose clients misbehave in every way ---------------------------

app = ClientApp()

# partition -> (what it sends, the reason it must be refused with)
MISBEHAVIOUR = {
    1: ("nan", "array 'arrays/head.weight' contains NaN or infinity"),
    2: ("inf", "array 'arrays/head.bias' contains NaN or infinity"),
    3: ("shape", "array 'head.weight' has shape"),
    4: ("dtype", "array 'head.weight' has dtype complex64, the global model has float32"),
    5: ("missing key", "arrays 'arrays' lack ['head.bias'] of the global model"),
    6: ("no count", "metric 'num-examples' (the strategy's weight) is missing"),
    7: ("zero count", "metric 'num-examples' is 0, not a positive count"),
    8: ("negative count", "metric 'num-examples' is -1000, not a positive count"),
    9: ("too many", "examples the client holds this round"),
    10: ("huge", "update norm"),
    11: ("raises", "RuntimeError: this client is broken"),
}
CLIENTS = 14  # 0, 12 and 13 behave
RAISES = 11


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = int(context.node_config["partition-id"])
    kind = MISBEHAVIOUR.get(partition, ("good", ""))[0]
    if kind == "raises":
        raise RuntimeError("this client is broken")
    reply = default.train(msg, context)
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    values = {name: arrays[name].numpy().copy() for name in arrays}
    if kind == "nan":
        values["head.weight"][0, 0] = np.nan
    elif kind == "inf":
        values["head.bias"][-1] = np.inf
    elif kind == "shape":
        values["head.weight"] = values["head.weight"][:, :-1]
    elif kind == "dtype":
        values["head.weight"] = values["head.weight"].astype(np.complex64)
    elif kind == "missing key":
        del values["head.bias"]
    elif kind == "huge":
        values = {name: np.full_like(v, 1e30) for name, v in values.items()}
    elif kind == "no count":
        del metrics["num-examples"]
    elif kind == "zero count":
        metrics["num-examples"] = 0
    elif kind == "negative count":
        metrics["num-examples"] = -1000
    elif kind == "too many":
        metrics["num-examples"] = int(metrics["num-examples"]) + 1
    reply.content["arrays"] = ArrayRecord({name: Array(v) for name, v in values.items()})
    return reply


BAD_APP = [
    f"clients.num={CLIENTS}",
    "scenario.num_tasks=1",
    "rounds=2",
    "client.app=tests.engine.test_screening:app",
    "log.progress=false",
]


class Recording(FedAvg):
    """FedAvg that keeps the replies it was given to aggregate."""

    def aggregate_train(self, server_round, replies):
        self.given = list(replies)
        return super().aggregate_train(server_round, self.given)


def in_process_round(*overrides: str) -> tuple[TrainStep, Recording, ArrayRecord]:
    """Round 1 of the bad app through the round loop's train step, in this process; the client
    that raises is left out (in-process, an exception is not turned into an error reply)."""
    grid = InProcessGrid([*BAD_APP, "engine.sum_on_actors=false", *overrides])
    grid.node_ids = [node for node in grid.node_ids if node != 1000 + RAISES]
    try:
        strategy = Recording()
        arrays = grid.initial_arrays()
        audit = DeletionAudit(grid.scenario, None)
        online = np.arange(len(grid.node_ids))
        step = _train_step(grid.cfg, strategy, grid, arrays, 1, online, audit, grid.scenario)
    finally:
        grid.close()
    return step, strategy, arrays


def test_a_round_refuses_every_bad_reply_and_aggregates_the_others():
    step, strategy, arrays = in_process_round()
    failed = dict(step.problems)
    refused = [p for p in MISBEHAVIOUR if p != RAISES]
    assert sorted(failed) == [1000 + p for p in refused]
    for partition in refused:
        assert failed[1000 + partition].startswith("invalid reply: ")
        assert MISBEHAVIOUR[partition][1] in failed[1000 + partition], partition
    assert (step.sampled, step.succeeded, step.discarded) == (CLIENTS - 1, 3, None)
    good = [r for r in strategy.given if not r.has_error()]
    assert sorted(r.metadata.src_node_id for r in good) == [1000, 1012, 1013]
    expected = aggregate_arrayrecords([r.content for r in good], "num-examples")
    for name in expected:
        np.testing.assert_array_equal(step.arrays[name].numpy(), expected[name].numpy())
        assert not np.array_equal(step.arrays[name].numpy(), arrays[name].numpy())


def test_past_max_rejected_the_round_aggregates_nothing():
    step, strategy, arrays = in_process_round("screen.max_rejected=9")
    assert step.discarded == "10 replies were invalid, more than screen.max_rejected=9"
    assert step.succeeded == 0
    assert all(r.has_error() for r in strategy.given)
    nodes = [1000 + c for c in range(CLIENTS) if c != RAISES]
    assert sorted(node for node, _ in step.problems) == nodes
    assert dict(step.problems)[1012] == f"dropped: {step.discarded}"
    for name in arrays:
        np.testing.assert_array_equal(step.arrays[name].numpy(), arrays[name].numpy())


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("summed", [False, True], ids=["replies", "summed-on-actors"])
def test_a_run_lists_every_refusal_and_still_learns(summed, tmp_path):
    out = tmp_path / "run"
    result = fedcl.run(
        None,
        [
            *BAD_APP,
            "engine.num_actors=2",
            f"engine.sum_on_actors={str(summed).lower()}",
            "train.epochs=5",
            "train.lr=0.1",
        ],
        out=out,
    )
    records = read_jsonl(out / "metrics.jsonl")
    assert len(records) == 2
    for record in records:
        failed = {f["node"] - 1000: f["reason"] for f in record["failures"]}
        assert sorted(failed) == sorted(MISBEHAVIOUR)
        for partition, (_, reason) in MISBEHAVIOUR.items():
            assert reason in failed[partition], (partition, failed[partition])
        assert (record["sampled"], record["replies"]) == (CLIENTS, 3)
        assert "no_updates" not in record
    assert result.summary["status"] == "completed"
    assert result.summary["client_failures"] == 2 * len(MISBEHAVIOUR)
    assert result.summary["rounds_without_updates"] == []
    # Not one poisoned value reached the global model: it is finite and has learned.
    assert all(np.isfinite(result.arrays[name].numpy()).all() for name in result.arrays)
    assert records[-1]["acc"]["0"] > 0.2  # chance is 0.1


@pytest.mark.usefixtures("ray_session")
def test_a_run_past_max_rejected_never_moves_the_model_even_summed_on_actors(tmp_path):
    overrides = [*BAD_APP, "engine.num_actors=2", "screen.max_rejected=0"]
    result = fedcl.run(None, overrides, out=tmp_path / "run")
    assert result.summary["status"] == "failed"
    assert result.summary["rounds_without_updates"] == [1, 2]
    for record in result.records:
        assert record["discarded"] == "10 replies were invalid, more than screen.max_rejected=0"
        assert record["no_updates"] is True and record["replies"] == 0
        dropped = [
            f["node"] - 1000 for f in record["failures"] if f["reason"].startswith("dropped")
        ]
        assert dropped == [0, 12, 13]
    grid = InProcessGrid(overrides)
    initial = grid.initial_arrays()
    grid.close()
    for name in initial:
        np.testing.assert_array_equal(result.arrays[name].numpy(), initial[name].numpy())
