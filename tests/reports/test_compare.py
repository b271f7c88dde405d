"""`fedcl compare`: the table's values are the summaries', the plot opens, bad input is one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from fedcl.cli import main
from fedcl.reports.compare import compare
from fedcl.reports.seeds import seeds_summary, write_seeds_summary
from tests.reports.folders import ACCS, TASKS, records, write_run


def _parent(folder: Path, accs: dict[int, float], with_summary: bool = True) -> Path:
    """A multi-seed parent with one hand-made run per seed (final acc `accs[seed]`); without
    its summary.json when not `with_summary` (seeds run one by one)."""
    summaries = {}
    for seed, acc in accs.items():
        summary = {
            "status": "completed",
            "acc": acc,
            "bwt": -acc / 2,
            "strategy": "fot",
            "deletion_audit": {"deleted": seed},
        }
        curve = [*ACCS[:-1], {"0": acc, "1": acc}]
        write_run(folder / f"seed_{seed}", summary, records(curve, TASKS))
        summaries[seed] = summary
    if with_summary:
        write_seeds_summary(folder, seeds_summary(list(accs), summaries, {}))
    return folder


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as file:
        return {row["run"]: row for row in csv.DictReader(file)}


def test_csv_values_are_the_summaries_and_the_parents_mean_and_std(tmp_path):
    single = {
        "status": "completed",
        "acc": 0.123456789,
        "bwt": -0.25,
        "strategy": "fedavg",
        "deletion_audit": {"deleted": 7},
    }
    run = write_run(tmp_path / "fedavg-run", single, records(ACCS, TASKS))
    parent = _parent(tmp_path / "fot-seeds", {0: 0.6, 1: 0.7, 2: 0.95})
    result = compare([run, parent], tmp_path / "cmp", default_metrics=("acc", "bwt", "nope"))

    rows = _rows(tmp_path / "cmp" / "compare.csv")
    assert list(rows) == ["fedavg", "fot"]  # labelled by strategy
    assert float(rows["fedavg"]["acc"]) == single["acc"] and rows["fedavg"]["acc_std"] == ""
    assert float(rows["fedavg"]["bwt"]) == single["bwt"]
    accs = np.array([0.6, 0.7, 0.95])
    assert float(rows["fot"]["acc"]) == pytest.approx(accs.mean(), rel=1e-15)
    assert float(rows["fot"]["acc_std"]) == pytest.approx(accs.std(ddof=1), rel=1e-15)
    assert float(rows["fot"]["bwt"]) == pytest.approx((-accs / 2).mean(), rel=1e-15)
    assert rows["fot"]["runs"] == "3" and rows["fedavg"]["runs"] == "1"
    assert "nope" not in rows["fot"]  # default columns: only those the runs hold

    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert markdown == result.markdown
    assert "| fedavg | 1 | 0.1235 | -0.2500 |" in markdown
    assert f"| fot | 3 | {accs.mean():.4f} ± {accs.std(ddof=1):.4f} |" in markdown
    image = imread(tmp_path / "cmp" / "avg_acc.png")
    assert image.ndim == 3 and image.shape[0] > 100


def test_metrics_labels_and_settings_choose_the_columns(tmp_path, capsys):
    a = write_run(
        tmp_path / "a",
        {"status": "completed", "acc": 0.5, "deletion_audit": {"deleted": 3}},
        records(ACCS, TASKS),
    )
    b = write_run(tmp_path / "b", {"status": "completed", "acc": 0.25}, records(ACCS, TASKS))
    out = tmp_path / "cmp"
    args = ["compare", str(a), str(b), "--out", str(out), "--metrics", "deletion_audit.deleted"]
    code = main([*args, "--labels", "x,y", "--settings", "scenario.num_tasks"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| x | 1 | 2 | 3 |" in printed and "| y | 1 | 2 | - |" in printed
    assert next(iter(_rows(out / "compare.csv").values()))["deletion_audit.deleted"] == "3.0"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metrics", "acc,nope"], "unknown metric 'nope' in these runs' summaries; valid: acc"),
        (["--labels", "one"], "--labels gives 1 label(s) for 2 run(s)"),
        (["--settings", "train.lrr"], "unknown config key 'train.lrr'"),
    ],
)
def test_bad_compare_input_is_one_line(extra, message, tmp_path, capsys):
    a = write_run(tmp_path / "a", {"status": "completed", "acc": 0.5}, records(ACCS, TASKS))
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(a), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedcl: error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_folders_that_cannot_be_compared_are_named(tmp_path, capsys):
    interrupted = write_run(tmp_path / "cut", None, records(ACCS[:2], TASKS[:2]))
    assert main(["compare", str(interrupted)]) == 2
    assert "has no summary.json: the run was interrupted" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_compare_a_real_multi_seed_run_with_one_of_its_seeds(seeds_run, tmp_path, capsys):
    parent = seeds_run.out_dir
    out = tmp_path / "cmp"
    assert main(["compare", str(parent), str(parent / "seed_0"), "--out", str(out)]) == 0
    rows = _rows(out / "compare.csv")
    summary = json.loads((parent / "summary.json").read_text())
    seed0 = json.loads((parent / "seed_0" / "summary.json").read_text())
    assert list(rows) == ["seeds", "seed_0"]  # same strategy: labelled by folder
    assert float(rows["seeds"]["acc"]) == summary["metrics"]["acc"]["mean"]
    assert float(rows["seeds"]["acc_std"]) == summary["metrics"]["acc"]["std"]
    assert float(rows["seed_0"]["acc"]) == seed0["acc"]
    assert imread(out / "avg_acc.png").ndim == 3


def test_seeds_run_one_by_one_compare_as_a_multi_seed_run(tmp_path, capsys):
    accs = {0: 0.6, 1: 0.7, 2: 0.95}
    written = _parent(tmp_path / "written" / "fot", accs)
    by_hand = _parent(tmp_path / "by-hand" / "fot", accs, with_summary=False)
    assert not (by_hand / "summary.json").exists()
    compare([written], tmp_path / "a")
    compare([by_hand], tmp_path / "b")
    written_rows, by_hand_rows = (
        _rows(tmp_path / "a" / "compare.csv"),
        _rows(tmp_path / "b" / "compare.csv"),
    )
    for row in (*written_rows.values(), *by_hand_rows.values()):
        del row["path"]
    assert written_rows == by_hand_rows
    assert not (by_hand / "summary.json").exists()  # compare reads, never writes, run folders

    write_run(by_hand / "seed_3", None, records(ACCS[:2], TASKS[:2]))  # still running
    assert main(["compare", str(by_hand)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "seed_3 has no summary.json" in err
