"""The event timeline: validation before a run, determinism, drift and deletion in client views."""

from __future__ import annotations

import numpy as np
import pytest

from fedcl.config import load_config
from fedcl.errors import ConfigError
from fedcl.scenario.builder import build_scenario
from fedcl.scenario.datasets import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def scenario_of(digits, *overrides):
    return build_scenario(load_config(None, ["clients.num=6", "rounds=12", *overrides]), digits)


def view(scenario, digits, client, server_round):
    ids, tasks = scenario.client_ids(client, server_round)
    concept = scenario.concept(client, server_round)
    return scenario.view(digits.x_train, digits.y_train, ids, tasks, concept)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ("{round: 3, kind: drfit}", "events[0]: unknown kind 'drfit'; valid: task, drift, delete"),
        ("{round: 13, kind: leave, clients: [1]}", "events[0]: round 13 is not within"),
        ("{round: 0, kind: join, clients: [1]}", "round 0 is not within the run's rounds 1..12"),
        ("{round: 3, kind: leave, clients: [6]}", "events[0]: unknown client 6; clients are 0..5"),
        ("{round: 3, kind: delete, what: class, class: 10}", "class 10 is not in the dataset"),
        ("{round: 3, kind: delete, what: everything}", "unknown delete 'what' 'everything'"),
        ("{round: 3, kind: task, task: 9}", "task 9 is not one of the scenario's tasks 0..4"),
        ("{round: 3, kind: drift, type: label_swap, pairs: [[1, 12]]}", "label_swap"),
        ("{round: 3, kind: drift, type: warp}", "warp"),
        ("{round: 3, kind: drift, type: noise, mode: recurrent}", "needs 'until'"),
        ("{round: 3, kind: join, clients: [1], speed: 2}", "unknown key 'speed' for a join event"),
    ],
)
def test_malformed_events_are_refused_before_the_run(digits, event, message):
    with pytest.raises(ConfigError) as error:
        scenario_of(digits, f"events=[{event}]")
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_generated_timeline_depends_on_the_seed_alone(digits):
    generate = "generate=[{kind: drift, rate: 0.5, type: noise, clients_per_event: 2}]"
    first = scenario_of(digits, generate, "engine.num_actors=1")
    second = scenario_of(digits, generate, "engine.num_actors=2")
    other_seed = scenario_of(digits, generate, "seed=1")
    as_json = [[e.to_json() for e in s.timeline] for s in (first, second, other_seed)]
    assert as_json[0] == as_json[1]
    assert as_json[0] != as_json[2]
    assert any(e.kind == "drift" for e in first.timeline)


def test_drift_changes_exactly_the_targeted_clients_from_its_round(digits):
    event = "{round: 5, kind: drift, clients: [1, 2], type: label_swap, pairs: [[0, 1]]}"
    plain = scenario_of(digits, "scenario.num_tasks=1")
    drifted = scenario_of(digits, "scenario.num_tasks=1", f"events=[{event}]")
    for client in range(6):
        for server_round in (4, 5, 9):
            before, after = (
                view(plain, digits, client, server_round),
                view(drifted, digits, client, server_round),
            )
            assert np.array_equal(before.ids, after.ids)
            assert np.array_equal(before.x, after.x)
            changed = not np.array_equal(before.y, after.y)
            assert changed == (client in (1, 2) and server_round >= 5)
            if changed:  # a swap of 0 and 1: exactly those labels moved
                swapped = {0: 1, 1: 0}
                assert np.array_equal(after.y, [swapped.get(int(v), int(v)) for v in before.y])


def test_recurrent_drift_restores_the_original_concept(digits):
    event = "{round: 3, kind: drift, type: noise, std: 1.0, mode: recurrent, until: 7}"
    plain = scenario_of(digits, "scenario.num_tasks=1")
    drifted = scenario_of(digits, "scenario.num_tasks=1", f"events=[{event}]")
    for server_round, differs in ((2, False), (3, True), (6, True), (7, False), (12, False)):
        a, b = view(plain, digits, 0, server_round), view(drifted, digits, 0, server_round)
        assert (not np.allclose(a.x, b.x)) == differs


def test_incremental_drift_ramps_its_severity(digits):
    event = "{round: 3, kind: drift, type: label_swap, pairs: [[0, 1]], mode: incremental, ramp: 4}"
    scenario = scenario_of(digits, "scenario.num_tasks=1", f"events=[{event}]")
    severities = [[s for _, s in scenario.concept(0, r)] for r in range(1, 9)]
    assert severities == [[], [], [0.25], [0.5], [0.75], [1.0], [1.0], [1.0]]


@pytest.mark.parametrize(
    "event",
    [
        "{round: 4, kind: delete, clients: [2], what: samples, fraction: 0.5}",
        "{round: 4, kind: delete, what: class, class: 1}",
        "{round: 4, kind: delete, clients: [2], what: client}",
    ],
)
def test_deleted_samples_leave_the_client_view_from_their_round(digits, event):
    scenario = scenario_of(digits, "scenario.num_tasks=1", f"events=[{event}]")
    deleted = np.flatnonzero(scenario.deletion_round <= 4)
    assert len(deleted) > 0
    for client in range(6):
        before = scenario.client_ids(client, 3)[0]
        after = scenario.client_ids(client, 4)[0]
        assert not np.isin(after, deleted).any()
        assert np.array_equal(np.sort(after), np.setdiff1d(before, deleted))
    if "what: client" in event:
        assert 2 not in scenario.available(4) and 2 in scenario.available(3)


def test_async_boundaries_give_clients_their_own_streams(digits):
    scenario = scenario_of(
        digits,
        "scenario.boundaries=async",
        "scenario.num_tasks=3",
        "scenario.async_start=3",
        "scenario.async_rounds_per_task=[2,4]",
        "scenario.async_shuffle=true",
    )
    tasks_by_round = [[scenario.task_of(c, r) for c in range(6)] for r in range(1, 13)]
    assert any(len({t for t in row if t >= 0}) > 1 for row in tasks_by_round)
    for client in range(6):
        for server_round in range(1, 13):
            task = scenario.task_of(client, server_round)
            ids, _ = scenario.client_ids(client, server_round)
            if task < 0:
                assert len(ids) == 0 and client not in scenario.available(server_round)
            else:
                assert set(digits.y_train[ids]) <= set(scenario.task_classes[task].tolist())


def test_recurring_tasks_and_blurry_boundaries(digits):
    scenario = scenario_of(
        digits,
        "scenario.num_tasks=2",
        "scenario.stream=[0,1,0]",
        "scenario.rounds_per_task=4",
        "scenario.blurry=0.2",
        "scenario.blurry_rounds=1",
    )
    assert [scenario.task_of(0, r) for r in (1, 4, 5, 8, 9, 12)] == [0, 0, 1, 1, 0, 0]
    ids, tasks = scenario.client_ids(0, 5)  # first round of task 1: some of task 0 mixed in
    share = (tasks == 0).mean() / (tasks == 1).mean()
    assert 0.15 < share < 0.25
    ids, tasks = scenario.client_ids(0, 6)  # later rounds: only task 1
    assert set(tasks.tolist()) == {1}
    assert not scenario.is_sequential()
    ids, tasks = scenario.client_ids(0, 5, task=1)  # one task's data alone: nothing mixed in
    assert np.array_equal(ids, scenario.train_indices(0, 1)) and set(tasks.tolist()) == {1}


def test_joining_clients_are_unavailable_before_their_round(digits):
    scenario = scenario_of(digits, "events=[{round: 5, kind: join, clients: [4, 5]}]")
    assert scenario.available(4) == [0, 1, 2, 3]
    assert scenario.available(5) == [0, 1, 2, 3, 4, 5]


def test_task_incremental_masks_each_sample_to_its_tasks_classes(digits):
    scenario = scenario_of(digits, "scenario.kind=task_incremental", "scenario.num_tasks=5")
    tasks = np.array([0, 3, 3, 4])
    mask = scenario.class_mask(tasks, 10)
    assert [np.flatnonzero(row).tolist() for row in mask] == [[0, 1], [6, 7], [6, 7], [8, 9]]
    assert scenario_of(digits).class_mask(tasks, 10) is None  # class-incremental: one head


def test_rotated_domains_rotate_images_by_task(digits):
    scenario = scenario_of(
        digits,
        "scenario.kind=domain_incremental",
        "scenario.domain_transform=rotation",
        "scenario.num_tasks=2",
    )
    x = digits.x_test[:3]
    assert np.array_equal(scenario.task_inputs(x, 0), x)
    assert np.allclose(scenario.task_inputs(x, 1), np.rot90(x, k=1, axes=(-2, -1)), atol=1e-5)
    with pytest.raises(ConfigError, match="needs image input"):
        build_scenario(
            load_config(
                None,
                [
                    "scenario.kind=domain_incremental",
                    "scenario.domain_transform=rotation",
                    "dataset.name=gaussian",
                ],
            ),
            load_dataset("gaussian"),
        )
