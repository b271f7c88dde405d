"""`fedcl bench`: the two reference loops agree, and the quick size produces every row and figure.

Timings are never asserted on: only that each figure exists and is finite.
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch

from fedcl.bench import run_bench
from fedcl.bench.cli import add_arguments, run_from_args
from fedcl.bench.loops import LeanLoop, NaiveLoop
from fedcl.bench.report import format_table
from fedcl.bench.runner import vectorize_available
from fedcl.bench.workload import (
    Workload,
    build_bench_model,
    prepare_data,
    sample_clients,
    synthetic_data,
)

FIGURES = (
    "updates_per_s",
    "round_s",
    "startup_s",
    "peak_rss_mib",
    "bytes_per_round",
    "lean_ratio",
)


@pytest.mark.parametrize(("model", "epochs"), [("mlp128", 1), ("cnn", 2)])
def test_lean_loop_computes_the_naive_loops_fedavg(model, epochs):
    workload = Workload(8, 3, model, rounds=3, epochs=epochs)
    data = synthetic_data(workload.num_clients, 64, (1, 40), seed=1)
    start = build_bench_model(workload, data.input_shape, data.num_classes)
    torch.set_num_threads(1)
    lean = LeanLoop(
        copy.deepcopy(start),
        torch.from_numpy(data.x),
        torch.from_numpy(data.y),
        batch_size=16,
        lr=0.05,
        epochs=epochs,
    )
    naive = NaiveLoop(copy.deepcopy(start), data.x, data.y, batch_size=16, lr=0.05, epochs=epochs)
    for server_round in range(1, workload.rounds + 1):
        clients = sample_clients(workload, server_round)
        lean.run_round(clients)
        naive.run_round(clients)

    lean_state, naive_state = lean.global_state(), naive.global_state()
    assert lean_state.keys() == naive_state.keys()
    for name, value in lean_state.items():
        torch.testing.assert_close(value, naive_state[name], rtol=1e-5, atol=1e-6)
    # ... and they did train: the global model moved away from the start.
    moved = max((v - start.state_dict()[k]).abs().max().item() for k, v in lean_state.items())
    assert moved > 1e-3


def test_bench_data_is_fedcls_partition_with_64_samples_per_client():
    workload = Workload(20, 5, "mlp256", rounds=2)
    data = prepare_data(workload)
    assert data.x.shape == (20, 64, 1, 40) and data.y.shape == (20, 64)
    # fedcl's IID partition is disjoint: no sample appears twice among the clients.
    rows = data.x.reshape(20 * 64, -1)
    assert len({row.tobytes() for row in rows}) == len(rows)
    assert 0 < len(data.y_test) <= workload.max_test


def test_quick_bench_produces_every_row_and_figure(tmp_path):
    out = tmp_path / "bench.json"
    report = run_bench(quick=True, out=out, progress=False)

    expected = ["lean", "naive", "fedcl-1", "fedcl", "flower"]
    if vectorize_available():
        expected.insert(4, "fedcl-vectorized")
    rows = report["rows"]
    assert [row["name"] for row in rows] == expected
    for row in rows:
        assert row["ok"], f"{row['label']}: {row['error']}"
        for figure in FIGURES:
            assert math.isfinite(row[figure]), (row["label"], figure, row[figure])
        assert row["updates_per_s"] > 0 and row["round_s"] > 0 and row["peak_rss_mib"] > 0
        assert row["cores"] >= 1
    for row in rows:
        if row["engine"] == "fedcl":
            assert math.isfinite(row["speedup_vs_flower"])
            assert row["bytes_per_round"] > 0 and row["bytes_measured"]
    assert report["machine"]["cores"] >= 1 and report["machine"]["torch"]

    written = json.loads(out.read_text())
    assert [row["name"] for row in written["rows"]] == expected
    assert written["machine"] == report["machine"]
    table = format_table(rows)
    for row in rows:
        assert row["label"] in table


def test_cli_runs_selected_rows_and_refuses_unknown_ones(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "refs.json"
    args = parser.parse_args(["--quick", "--engines", "lean,naive", "--out", str(out)])
    assert run_from_args(args) == 0
    printed = capsys.readouterr().out
    assert "lean loop" in printed and "naive loop" in printed
    assert "fedcl 1 actor" not in printed and "Flower run_simulation" not in printed
    assert [row["name"] for row in json.loads(out.read_text())["rows"]] == ["lean", "naive"]

    bad = parser.parse_args(["--quick", "--engines", "lean,warp", "--out", str(tmp_path / "x")])
    assert run_from_args(bad) == 2
    assert "unknown engine(s) warp" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_cli_lists_the_runners_engines():
    from fedcl.bench import cli, runner

    assert cli.ENGINE_NAMES == runner.ENGINE_NAMES


def test_workloads_are_picked_by_key_and_unknown_ones_named(tmp_path, capsys):
    from fedcl.bench.runner import bench_workloads

    keys = [w.key for w in bench_workloads(quick=False)]
    assert "1000-50-mlp128" in keys and len(set(keys)) == len(keys)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    report = run_bench(
        engines=["lean"], workloads=["100-10-mlp256"], rounds=2, out=None, progress=False
    )
    assert [w["num_clients"] for w in report["settings"]["workloads"]] == [100]
    assert [row["workload_label"] for row in report["rows"]] == ["100/10 MLP 40-256-256-10"]
    bad = parser.parse_args(["--quick", "--workloads", "7-7-mlp9", "--out", str(tmp_path / "x")])
    assert run_from_args(bad) == 2
    err = capsys.readouterr().err
    assert "unknown workload(s) 7-7-mlp9; valid: 20-5-mlp256" in err
    assert not (tmp_path / "x").exists()


def test_set_overrides_reach_the_fedcl_rows_and_a_wrong_key_stops_the_bench(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "set.json"
    overrides = ["--set", "engine.num_actors=1", "--set", "engine.balance=false"]
    args = parser.parse_args(["--quick", "--engines", "lean,fedcl", *overrides, "--out", str(out)])
    assert run_from_args(args) == 0
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["fedcl"]["cores"] == 1  # the row for "as many actors as fit" ran on 1
    assert rows["fedcl"]["overrides"][-2:] == ["engine.num_actors=1", "engine.balance=false"]
    assert rows["lean"]["overrides"] == []
    assert report["settings"]["fedcl_overrides"] == ["engine.num_actors=1", "engine.balance=false"]
    assert "engine.balance=false" in capsys.readouterr().out  # in the printed notes

    wrong = ["--quick", "--engines", "lean", "--set", "engine.balanse=false"]
    assert run_from_args(parser.parse_args([*wrong, "--out", str(tmp_path / "y")])) == 2
    error = capsys.readouterr().err
    assert "engine.balanse" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()
