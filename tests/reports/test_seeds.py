"""Several seeds in one command: per-seed run folders, their aggregate, failures said out loud."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fedcl.api
from fedcl.cli import main
from fedcl.engine.loop import RunResult
from fedcl.errors import StrategyError
from fedcl.reports.runfolder import scalar_metrics
from fedcl.reports.seeds import aggregate, run_seeds
from tests.reports.conftest import TINY

QUICKSTART = str(Path(__file__).resolve().parents[2] / "simulations" / "quickstart.yaml")


def test_a_real_multi_seed_run_aggregates_its_per_seed_summaries(seeds_run):
    parent = seeds_run.out_dir
    summary = json.loads((parent / "summary.json").read_text())
    assert summary["kind"] == "seeds" and summary["status"] == "completed" and seeds_run.ok
    assert summary["completed"] == [0, 1] and summary["failed"] == {}
    per_seed = [json.loads((parent / f"seed_{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert [s["status"] for s in per_seed] == ["completed", "completed"]
    # The seeds really differ (else the aggregate proves nothing) ...
    assert per_seed[0]["acc"] != per_seed[1]["acc"]
    # ... and every scalar metric's aggregate is numpy's mean and sample std of the seeds' values.
    names = set(scalar_metrics(per_seed[0])) | set(scalar_metrics(per_seed[1]))
    assert {"acc", "wall_s", "deletion_audit.deleted"} <= names == set(summary["metrics"])
    for name in names:
        held = {
            str(seed): scalar_metrics(s)[name]
            for seed, s in enumerate(per_seed)
            if name in scalar_metrics(s)
        }
        values = np.array(list(held.values()))
        entry = summary["metrics"][name]
        assert entry["n"] == len(values)
        assert entry["mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
        if len(values) > 1:
            assert entry["std"] == pytest.approx(values.std(ddof=1), rel=1e-12, abs=1e-12)
        assert entry["values"] == held
    assert summary["metrics"]["acc"]["n"] == 2


def test_aggregate_counts_only_the_seeds_that_hold_a_metric():
    metrics = aggregate(
        {0: {"acc": 0.5, "bwt": None}, 1: {"acc": 0.7, "bwt": -0.2}, 2: {"acc": 0.9}}
    )
    assert metrics["acc"]["n"] == 3
    assert metrics["acc"]["mean"] == pytest.approx(0.7)
    assert metrics["acc"]["std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert metrics["bwt"] == {"mean": -0.2, "std": None, "n": 1, "values": {"1": -0.2}}


def _fake_run(fail: dict[int, BaseException | str]):
    """A stand-in for fedcl.api.run: writes a minimal run folder; seed s raises fail[s], or
    returns a failed summary when fail[s] is a string."""

    def run(config, *overrides, out, progress=None, **values):
        seed = values["seed"]
        out.mkdir(parents=True)
        (out / "config.yaml").write_text(f"seed: {seed}\n")
        problem = fail.get(seed)
        if isinstance(problem, BaseException):
            raise problem
        if isinstance(problem, str):
            summary = {"status": "failed", "error": problem}
        else:
            summary = {"status": "completed", "acc": 0.1 * (seed + 1)}
        (out / "summary.json").write_text(json.dumps(summary))
        return RunResult(out, summary)

    return run


def test_a_failed_seed_is_named_and_the_command_exits_1(tmp_path, monkeypatch, capsys):
    fail = {1: StrategyError("strategy 'x' raised in aggregate_train at round 2: boom"), 2: "no"}
    monkeypatch.setattr(fedcl.api, "run", _fake_run(fail))
    out = tmp_path / "parent"
    code = main(["run", QUICKSTART, "--seeds", "0", "1", "2", "3", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("fedcl: error: seed 1 failed: strategy 'x' raised") and "seed 2" in err
    assert err.count("\n") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["completed"] == [0, 3]
    assert summary["failed"] == {"1": str(fail[1]), "2": "no"}
    assert summary["metrics"]["acc"]["n"] == 2
    assert summary["metrics"]["acc"]["mean"] == pytest.approx(0.25)


def test_a_crash_in_one_seed_does_not_stop_the_others_and_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(fedcl.api, "run", _fake_run({0: RuntimeError("actor exploded")}))
    result = run_seeds(QUICKSTART, seeds=[0, 1], out=tmp_path / "p")
    assert not result.ok
    assert result.failed == {0: "RuntimeError: actor exploded"}
    assert result.summary["completed"] == [1]


def test_ctrl_c_leaves_a_parent_summary_that_says_interrupted(tmp_path, monkeypatch):
    monkeypatch.setattr(fedcl.api, "run", _fake_run({1: KeyboardInterrupt()}))
    with pytest.raises(KeyboardInterrupt):
        run_seeds(QUICKSTART, seeds=[0, 1, 2], out=tmp_path / "p")
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["completed"] == [0] and summary["not_run"] == [1, 2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0", "x"], "--seeds takes integers, got 'x'"),
        (["--seeds", "0", "0"], "seeds must differ; repeated: 0"),
        (["--seeds", "0", "1", "seed=3"], "not with the key 'seed'"),
        (["--seeds", "0", "1", "train.lrr=1"], "unknown config key 'train.lrr'"),
        (["--seeds", "rounds=3"], "--seeds needs at least one seed"),
    ],
)
def test_bad_seeds_are_one_line_and_write_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "parent"
    code = main(["run", QUICKSTART, *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedcl: error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_a_parent_folder_holding_a_seed_run_is_refused_before_any_run(tmp_path, capsys):
    out = tmp_path / "parent"
    (out / "seed_1").mkdir(parents=True)
    (out / "seed_1" / "metrics.jsonl").write_text("")
    assert main(["run", QUICKSTART, *TINY, "--seeds", "0", "1", "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["seed_1"]


def test_all_seeds_completed_prints_the_aggregate_and_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fedcl.api, "run", _fake_run({}))
    out = tmp_path / "parent"
    assert main(["run", QUICKSTART, "rounds=5", "--seeds", "0", "1", "--out", str(out)]) == 0
    first, second = capsys.readouterr().out.splitlines()
    printed = json.loads(first)
    assert printed["seeds"] == [0, 1]
    assert printed["acc"] == {
        "mean": pytest.approx(0.15),
        "std": pytest.approx(0.1 / 2**0.5),
        "n": 2,
    }
    assert second == f"run folders: {out} (seed_0, seed_1)"
    assert sorted(p.name for p in out.iterdir()) == ["seed_0", "seed_1", "summary.json"]
