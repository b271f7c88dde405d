"""A scenario at scale: per-round queries read tables (their cost does not grow with the clients
registered), agree with their per-client definitions, and the shipped object is bytes a client."""

from __future__ import annotations

import pickle
import random
import sys
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from fedcl.config import load_config
from fedcl.scenario.builder import build_scenario
from fedcl.scenario.datasets import load_dataset
from fedcl.scenario.events import events_at
from fedcl.scenario.partition import PARTITIONS, partition_indices, partition_packed
from fedcl.scenario.scenario import Scenario


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# --- the tables agree with the per-client definitions --------------------------------------------


def _random_overrides(seed: int) -> list[str]:
    """A small scenario with a random timeline: async or global streams, recurring tasks,
    joins, leaves, client deletions, drifts on some or all clients."""
    rng = random.Random(seed)
    n, rounds = rng.randint(1, 10), rng.randint(2, 12)
    tasks = rng.randint(1, min(3, rounds))
    overrides = [f"clients.num={n}", f"rounds={rounds}", f"scenario.num_tasks={tasks}"]
    overrides.append(f"seed={seed}")
    if rng.random() < 0.5:
        overrides += ["scenario.boundaries=async", f"scenario.async_start={rng.randint(0, 3)}"]
        overrides += [f"scenario.async_rounds_per_task=[1,{rng.randint(1, 3)}]"]
    events = []
    for _ in range(rng.randint(0, 5)):
        server_round = rng.randint(1, rounds)
        clients = sorted(rng.sample(range(n), rng.randint(1, n)))
        kind = rng.choice(["join", "leave", "task", "drift", "drift", "delete"])
        head = f"round: {server_round}, kind: {kind}, clients: {clients}"
        tail = {
            "task": f", task: {rng.randrange(tasks)}",
            "drift": ", type: noise, std: 0.5, mode: incremental, ramp: 2",
            "delete": ", what: client",
        }.get(kind, "")
        events.append("{" + head + tail + "}")
    if rng.random() < 0.3:
        events.append(f"{{round: {rng.randint(1, rounds)}, kind: drift, type: noise}}")
    return [*overrides, f"events=[{', '.join(events)}]"]


def _starts(event, client: int) -> bool:
    return event.kind == "task" and client in event.clients


class PerClient:
    """Each round query as its definition says, client by client, from the timeline itself."""

    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        self.streams = [
            [(e.round, e.params["task"]) for e in scenario.timeline if _starts(e, c)]
            for c in range(scenario.num_clients)
        ]

    def task_of(self, c: int, r: int) -> int:
        started = [task for start, task in self.streams[c] if start <= r]
        return started[-1] if started else -1

    def available(self, r: int) -> list[int]:
        s = self.s
        return [
            c
            for c in range(s.num_clients)
            if s.join_round[c] <= r < s.leave_round[c] and self.task_of(c, r) >= 0
        ]

    def seen_tasks(self, r: int) -> list[int]:
        return sorted({task for stream in self.streams for start, task in stream if start <= r})

    def global_task(self, r: int) -> int:
        tasks = [self.task_of(c, r) for c in self.available(r)]
        if not tasks:
            return max(self.task_of(c, r) for c in range(self.s.num_clients))
        values, counts = np.unique(tasks, return_counts=True)
        return int(values[np.argmax(counts)])

    def client_task_ends(self, r: int) -> list[tuple[int, int]]:
        ends = []
        for c in range(self.s.num_clients):
            task, leave = self.task_of(c, r), self.s.leave_round[c]
            if task < 0 or r >= leave:
                continue
            starts_next = any(start == r + 1 for start, _ in self.streams[c])
            if r == self.s.rounds or r + 1 >= leave or starts_next:
                ends.append((c, task))
        return ends

    def concept_groups(self, r: int, clients: list[int]) -> list[tuple[tuple, list[int]]]:
        groups: dict[tuple, list[int]] = {}
        for c in clients:
            key = tuple((span.event, sev) for span, sev in self.s.concept(c, r))
            groups.setdefault(key, []).append(c)
        return list(groups.items())


@pytest.mark.parametrize("seed", range(40))
def test_round_queries_agree_with_their_per_client_definitions(digits, seed: int) -> None:
    scenario = build_scenario(load_config(None, _random_overrides(seed)), digits)
    slow = PerClient(scenario)
    clients = np.arange(scenario.num_clients)
    for r in range(-1, scenario.rounds + 3):
        assert scenario.seen_tasks(r) == slow.seen_tasks(r)
        assert scenario.available(r) == slow.available(r)
        assert scenario.available_count(r) == len(slow.available(r))
        assert scenario.global_task(r) == slow.global_task(r)
        assert scenario.client_task_ends(r) == slow.client_task_ends(r)
        assert scenario.tasks_of(clients, r).tolist() == [slow.task_of(c, r) for c in clients]
        assert [scenario.task_of(c, r) for c in clients] == [slow.task_of(c, r) for c in clients]
        some = [int(c) for c in np.random.default_rng(r + 2).permutation(clients)[: seed % 7]]
        groups = scenario.concept_groups(r, np.array(some, dtype=np.int64))
        as_keys = [(tuple((s.event, v) for s, v in k), m.tolist()) for k, m in groups]
        assert as_keys == slow.concept_groups(r, some)


def test_an_event_on_every_client_holds_a_range_and_is_found_by_round(digits) -> None:
    scenario = build_scenario(load_config(None, ["clients.num=5", "rounds=10"]), digits)
    first = scenario.timeline[0]
    assert first.clients == range(5) and first.to_json()["clients"] == [0, 1, 2, 3, 4]
    for r in range(0, 12):
        assert events_at(scenario.timeline, r) == [e for e in scenario.timeline if e.round == r]


# --- a round's cost does not grow with the clients registered ------------------------------------


def _work(call: Callable[[], object]) -> tuple[int, int]:
    """(Python lines run, peak bytes allocated) by `call`: a loop over clients shows in the
    first, an array pass over clients (numpy reports its buffers to tracemalloc) in the second."""
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return tracer

    tracemalloc.start()
    tracemalloc.reset_peak()
    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return lines, peak


@pytest.fixture(scope="module")
def two_sizes() -> dict[int, Scenario]:
    """The same timeline with 1,000 and 100,000 registered clients."""
    data = load_dataset("gaussian", num_classes=2, dim=2, train_per_class=100_000, test_per_class=1)
    events = (
        "events=[{round: 3, kind: join, clients: [5, 6]}, {round: 6, kind: leave, clients: [7]},"
        " {round: 2, kind: drift, clients: [1, 2], type: noise}]"
    )
    return {
        n: build_scenario(
            load_config(
                None,
                [f"clients.num={n}", "rounds=8", "scenario.num_tasks=2", events],
            ),
            data,
        )
        for n in (1_000, 100_000)
    }


ONLINE = np.arange(0, 1_000, 20)  # the clients of a round, registered in both sizes


def _round_queries(scenario: Scenario, r: int) -> Callable[[], object]:
    def queries() -> object:
        return (
            scenario.global_task(r),
            scenario.seen_tasks(r),
            scenario.available_count(r),
            scenario.available_array(r),
            scenario.client_task_ends(r),
            events_at(scenario.timeline, r),
            scenario.tasks_of(ONLINE, r),
            scenario.concept_groups(r, ONLINE),
            [scenario.concept(int(c), r) for c in ONLINE],
        )

    return queries


def test_a_rounds_queries_cost_the_same_with_100x_more_clients_registered(two_sizes) -> None:
    for r in (1, 2, 3, 5, 6, 7):  # rounds 4 and 8 end every client's task: 100x more pairs
        work = {}
        for n, scenario in two_sizes.items():
            queries = _round_queries(scenario, r)
            queries()  # the first call of a round may build tables or the available ids
            work[n] = _work(queries)
        (small_lines, _), (large_lines, large_peak) = work[1_000], work[100_000]
        assert large_lines == small_lines, f"round {r}: a Python loop over registered clients"
        # An int64 (or bool) array over the registered clients would take 800 (100) kB.
        assert large_peak < 32_000, f"round {r}: {large_peak} bytes, an array over clients"


def test_task_ends_cost_the_pairs_they_return(two_sizes) -> None:
    for n, scenario in two_sizes.items():
        assert len(scenario.client_task_ends(4)) == n
        assert scenario.client_task_ends(5) == [(7, 1)]  # it leaves in round 6


def test_available_ids_are_computed_once_per_change_of_the_available_set(two_sizes) -> None:
    scenario = two_sizes[100_000]
    ids = [scenario.available_array(r) for r in range(1, 9)]
    # Clients 5 and 6 join in round 3 and client 7 leaves in round 6: three distinct sets.
    assert ids[0] is ids[1] and ids[2] is ids[3] is ids[4] and ids[5] is ids[6] is ids[7]
    assert len(ids[0]) == 99_998 and len(ids[2]) == 100_000 and len(ids[5]) == 99_999
    assert not ids[0].flags.writeable


def test_the_shipped_scenario_is_bytes_per_client_without_the_round_tables(two_sizes) -> None:
    scenario = two_sizes[100_000]
    scenario.global_task(1)
    assert "round_tables" in vars(scenario)
    shipped = pickle.dumps(scenario, protocol=5)
    assert "round_tables" not in vars(pickle.loads(shipped))
    # Per client: its samples' positions and deletion rounds (2 × 8 B), its offsets into them
    # (2 tasks × 8 B), its stream (8 B offset + 2 × 8 B entries), join and leave (2 × 8 B).
    assert len(shipped) < 90 * scenario.num_clients


# --- the vectorized partition is the per-client one ----------------------------------------------


def _reference_partition(labels, num_clients, scheme, rng, alpha, shards_per_client, minimum):
    """The partition as first written, one Python step per client: the packed one must match."""
    if scheme == "iid":
        parts = np.array_split(rng.permutation(len(labels)), num_clients)
    elif scheme == "shards":
        shards = np.array_split(np.argsort(labels, kind="stable"), num_clients * shards_per_client)
        owner_of = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
        parts = [np.concatenate([shards[s] for s in owned]) for owned in owner_of]
    else:
        by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        for _ in range(100):
            cuts, sizes = [], np.zeros(num_clients, dtype=np.int64)
            for members in by_class:
                cut = np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(members)
                cuts.append(cut.astype(np.int64))
                sizes += np.diff(cuts[-1], prepend=0, append=len(members))
            if sizes.min() >= minimum:
                break
        chunks = [[] for _ in range(num_clients)]
        for members, cut in zip(by_class, cuts, strict=True):
            for client, chunk in enumerate(np.split(rng.permutation(members), cut)):
                chunks[client].append(chunk)
        parts = [np.concatenate(c) if c else np.zeros(0, np.int64) for c in chunks]
    sizes = np.array([len(p) for p in parts])
    for client in np.flatnonzero(sizes < minimum):
        while sizes[client] < minimum:
            donor = int(np.argmax(sizes))
            give = int(min(minimum - sizes[client], sizes[donor] - minimum))
            parts[client] = np.concatenate([parts[client], parts[donor][-give:]])
            parts[donor] = parts[donor][:-give]
            sizes[client] += give
            sizes[donor] -= give
    return [np.sort(p) for p in parts]


@pytest.mark.parametrize("scheme", PARTITIONS)
@pytest.mark.parametrize("seed", range(12))
def test_the_packed_partition_is_the_per_client_one(scheme: str, seed: int) -> None:
    rng = random.Random(seed)
    num_clients, minimum = rng.randint(1, 40), rng.choice([0, 1, 3])
    labels = np.random.default_rng(seed).integers(0, rng.randint(1, 10), rng.randint(120, 400))
    options = {"alpha": rng.choice([0.01, 0.5, 50.0]), "shards_per_client": rng.randint(1, 3)}
    expected = _reference_partition(
        labels, num_clients, scheme, np.random.default_rng(seed), **options, minimum=minimum
    )
    args = (labels, num_clients, scheme)
    positions, offsets = partition_packed(
        *args, np.random.default_rng(seed), **options, min_per_client=minimum
    )
    parts = partition_indices(*args, np.random.default_rng(seed), **options, min_per_client=minimum)
    assert len(offsets) == num_clients + 1
    for client, part in enumerate(expected):
        assert np.array_equal(positions[offsets[client] : offsets[client + 1]], part)
        assert np.array_equal(parts[client], part)
