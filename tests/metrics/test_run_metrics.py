"""The run-level metrics of one tiny real run, checked against what the run actually did:
`eval.every`'s rounds, summary.json against metrics.jsonl, bytes per round against the messages
that crossed, the validation split against the ids clients trained on, peak memory."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import ray
from flwr.app import RecordDict

import fedcl
from fedcl.config import load_config
from fedcl.engine.grid import RayGrid
from fedcl.engine.packing import pack, unpack
from fedcl.metrics.continual import continual_summary
from fedcl.metrics.run_metrics import evaluation_rounds, resolution
from fedcl.metrics.system import MB, peak_rss_bytes
from fedcl.scenario.builder import build_scenario
from fedcl.scenario.datasets import load_dataset

ROUNDS, EVERY = 7, 3
# 3 tasks over 7 rounds: tasks end at rounds 2, 4 and 7.
OVERRIDES = [
    f"rounds={ROUNDS}",
    "scenario.num_tasks=3",
    "clients.num=4",
    "strategy.fraction_train=0.5",  # 2 of 4: some rounds sample 2 of one actor's clients
    "clients.partition=iid",
    "model.hidden=[16]",
    "train.epochs=1",
    "engine.num_actors=2",
    "engine.vectorize=off",
    "checkpoint.every=0",
    f"eval.every={EVERY}",
    "dataset.validation=0.2",
]


class _Spy:
    """Counts, independently of the grid, what every actor call carried and returned: the bytes
    in the object store, and the call's arguments and result pickled again from their objects."""

    def __init__(self) -> None:
        self.sent = self.received = self.moves = 0
        self.rounds: list[tuple[tuple[int, int], tuple[int, int]]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        submit, deliver, take = RayGrid._submit, RayGrid._deliver, RayGrid.take_traffic
        start_moves = RayGrid._start_moves
        spy = self

        def spy_submit(grid, call):
            for ref in call.contents.values():
                stored = ray.get(ref)
                assert isinstance(unpack(stored), RecordDict)
                spy.sent += len(stored)
            spy.sent += len(pack((call.batch, call.plan, call.arriving)))
            return submit(grid, call)

        def spy_deliver(grid, call, result):
            spy.received += len(pack(result))
            return deliver(grid, call, result)

        def spy_start_moves(grid, *args):
            moving = start_moves(grid, *args)
            for ref, moves in moving.values():
                spy.sent += len(pack(list(moves)))
                states = len(ray.get(ref))  # moved clients' states: up, then down again
                spy.received += states
                spy.sent += states
                spy.moves += len(moves)
            return moving

        def spy_take(grid):
            counted = take(grid)
            spy.rounds.append((counted, (spy.sent, spy.received)))
            spy.sent = spy.received = 0
            return counted

        monkeypatch.setattr(RayGrid, "_submit", spy_submit)
        monkeypatch.setattr(RayGrid, "_deliver", spy_deliver)
        monkeypatch.setattr(RayGrid, "take_traffic", spy_take)
        monkeypatch.setattr(RayGrid, "_start_moves", spy_start_moves)


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("run-metrics") / "run"
    spy = _Spy()
    with pytest.MonkeyPatch.context() as monkeypatch:
        spy.install(monkeypatch)
        result = fedcl.run("simulations/quickstart.yaml", *OVERRIDES, out=out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return out, records, summary, spy, result


def test_eval_every_evaluates_exactly_the_expected_rounds(run):
    _, records, summary, _, _ = run
    evaluated = [r["round"] for r in records if "acc" in r]
    # Every 3rd round (3, 6), each task's last round (2, 4, 7) and the final round (7).
    assert evaluated == [2, 3, 4, 6, 7]
    assert all("avg_acc" not in r for r in records if r["round"] not in evaluated)
    assert summary["eval_every"] == EVERY
    assert "every 3 rounds" in summary["stability_gap_resolution"]


def test_no_tensorboard_folder_unless_asked(run):
    out = run[0]
    assert not (out / "tensorboard").exists()


def test_evaluation_rounds_by_hand():
    assert evaluation_rounds(10, 2, [5, 10]) == {2, 4, 5, 6, 8, 10}
    assert evaluation_rounds(10, 4, [3]) == {3, 4, 8, 10}
    assert evaluation_rounds(5, 1, []) == {1, 2, 3, 4, 5}
    assert evaluation_rounds(5, 9, []) == {5}
    assert resolution(1)["stability_gap_resolution"].endswith("every round")
    with pytest.raises(ValueError, match="eval.every"):
        evaluation_rounds(5, 0, [])


def test_summary_agrees_with_metrics_recomputed_from_metrics_jsonl(run):
    _, records, summary, _, _ = run
    recomputed = continual_summary(records, 3, summary["init_acc"])
    for key in ("acc", "bwt", "fgt", "forgetting_max", "min_acc", "wc_acc", "windowed_forgetting"):
        assert summary[key] == pytest.approx(recomputed[key]), key
    assert summary["fgt"] == pytest.approx(-summary["bwt"])
    val_rows = [
        {"round": r["round"], "task": r["task"], "acc": r["val_acc"]} for r in records if "acc" in r
    ]
    val = continual_summary(val_rows, 3)
    assert summary["val_acc"] == pytest.approx(val["acc"])
    assert summary["val_fgt"] == pytest.approx(val["fgt"])
    last = records[-1]
    assert last["val_avg_acc"] == pytest.approx(np.mean(list(last["val_acc"].values())))


def test_bytes_per_round_equal_the_serialized_messages_that_crossed(run):
    _, records, summary, spy, _ = run
    assert len(spy.rounds) == ROUNDS
    for record, (counted, crossed) in zip(records, spy.rounds, strict=True):
        assert (record["bytes_sent"], record["bytes_received"]) == counted == crossed
        assert record["bytes_sent"] > 0 and record["bytes_received"] > 0
    assert spy.moves > 0  # clients moved between actors (`engine.balance`), counted too
    assert summary["bytes_sent"] == sum(r["bytes_sent"] for r in records)
    assert summary["bytes_received_per_round"] == pytest.approx(
        sum(r["bytes_received"] for r in records) / ROUNDS
    )


def test_peak_memory_is_recorded_per_round_and_never_falls(run):
    _, records, summary, _, _ = run
    driver = [r["peak_rss_driver_mb"] for r in records]
    actors = np.array([r["peak_rss_actors_mb"] for r in records])
    assert actors.shape == (ROUNDS, 2) and (actors > 0).all()
    assert driver == sorted(driver) and (np.diff(actors, axis=0) >= 0).all()  # peaks so far
    assert summary["peak_rss_actor_mb"] == pytest.approx(actors.max())
    assert summary["peak_rss_actors_total_mb"] == pytest.approx(actors[-1].sum())


def test_held_out_samples_are_never_trained_on(run):
    out, _, _, _, _ = run
    cfg = load_config(out / "config.yaml")
    dataset = load_dataset(cfg.dataset.name, seed=cfg.seed)
    scenario = build_scenario(cfg, dataset)
    held = np.concatenate(scenario.validation_indices)
    assert len(held) > 0
    trained = []
    for path in sorted((out / "trained_samples").glob("round_*.npz")):
        with np.load(path) as data:
            trained.extend(data[name] for name in data.files)
    trained_ids = np.concatenate(trained)
    assert len(trained_ids) > 0
    assert not np.isin(trained_ids, held).any()


def test_peak_rss_reads_the_process_high_water_mark(ray_session):
    # The driver: at least what it holds now.
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    assert peak_rss_bytes() >= pages * os.sysconf("SC_PAGE_SIZE")

    @ray.remote(num_cpus=0)
    class Holder:
        def grow(self, megabytes: int) -> int:
            block = np.ones(megabytes * MB, dtype=np.uint8)  # touched: resident
            return int(block.sum() // MB)

        def hwm(self) -> int:
            status = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024

        def peak(self) -> int:
            return peak_rss_bytes()  # what ClientActor.handle reports with every result

    actor = Holder.remote()
    before = ray.get(actor.peak.remote())
    assert ray.get(actor.grow.remote(64)) == 64
    after = ray.get(actor.peak.remote())
    assert after >= before + 60 * MB
    assert after == pytest.approx(ray.get(actor.hwm.remote()), rel=0.02)
    ray.kill(actor)
