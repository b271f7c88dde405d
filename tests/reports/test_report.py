"""`fedcl report`: a self-contained page with the run's values, figures and events."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

from matplotlib.image import imread

from fedcl.cli import main
from fedcl.reports.figures import event_rounds
from fedcl.reports.html_report import write_report
from fedcl.reports.runfolder import scalar_metrics
from fedcl.reports.text import fmt
from tests.reports.folders import ACCS, TASKS, records, write_run


def _pngs(page: str) -> list:
    """The page's embedded PNGs, decoded and opened."""
    data = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [imread(io.BytesIO(base64.b64decode(d)), format="png") for d in data]


def test_report_of_a_real_run_holds_its_values_figures_and_events(seeds_run, capsys):
    run_dir = seeds_run.out_dir / "seed_0"
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out == f"report: {run_dir / 'report.html'}\n"
    page = (run_dir / "report.html").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, value in scalar_metrics(summary).items():
        assert f'<th>{name}</th><td class="num">{fmt(value)}</td>' in page
    # matrix, accuracy over rounds, per-client spread (drift), system figures: all open
    images = _pngs(page)
    assert len(images) == 4 and all(i.ndim == 3 and i.shape[0] > 100 for i in images)
    assert "src=" not in re.sub(r'src="data:image/png;base64,[^"]+"', "", page)  # nothing else
    # The run's events, by round and kind, with their parameters.
    assert "2 task, 1 drift, 1 delete" in page
    assert "<td class='num'>3</td><td>drift</td><td>2: 0, 1</td>" in page
    assert "type=label_swap" in page and "what=samples, fraction=0.5" in page
    assert "name: tiny-reports" in page  # the config


def test_an_interrupted_run_gets_a_report_of_its_rounds(tmp_path):
    run = write_run(
        tmp_path / "cut",
        None,
        records(ACCS[:3], TASKS[:3]),
        config={"name": "cut", "rounds": 10, "scenario": {"num_tasks": 2}},
    )
    page = write_report(run).read_text()
    assert "Interrupted run:" in page and "3 round(s) recorded (rounds 1–3 of 10)" in page
    assert f"fedcl run --resume {run}" in page
    assert "Computed from the 3 round(s) recorded" in page
    assert f'<th>acc</th><td class="num">{fmt(0.5)}</td>' in page  # mean of 0.4 and 0.6
    assert len(_pngs(page)) == 3  # matrix, accuracy over rounds, system; no per-client data


def test_a_copied_real_run_without_summary_is_reported_as_interrupted(seeds_run, tmp_path):
    run = tmp_path / "cut"
    shutil.copytree(seeds_run.out_dir / "seed_1", run)
    (run / "summary.json").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:30])  # cut mid-line
    page = write_report(run).read_text()
    assert "Interrupted run:" in page and "2 round(s) recorded (rounds 1–2 of 4)" in page


def test_folders_that_are_not_runs_get_one_line(tmp_path, capsys, seeds_run):
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "empty": "is not a run folder (no config.yaml or metrics.jsonl); give a folder",
        tmp_path / "missing": "is not a folder; give a run folder written by fedcl run",
        seeds_run.out_dir: "holds a multi-seed run; give one of its run folders (e.g. ",
    }
    for folder, message in cases.items():
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"fedcl: error: {folder} ") and err.count("\n") == 1
        assert message in err and "Traceback" not in err
        assert not (Path(folder) / "report.html").exists()


def test_a_failed_run_says_why_and_still_shows_its_rounds(tmp_path):
    error = "strategy 'x' raised in on_task_end at round 2: boom"
    run = write_run(tmp_path / "failed", {"status": "failed", "error": error}, records(ACCS, TASKS))
    page = write_report(run).read_text()
    assert f"<b>Run failed:</b> {error.replace(chr(39), '&#x27;')}</p>" in page
    assert "Computed from the 4 round(s) recorded" in page
    assert f'<th>acc</th><td class="num">{fmt(0.6)}</td>' in page


def test_task_switches_of_some_clients_are_told_apart_from_global_ones():
    events = [
        {"round": 1, "kind": "task", "clients": [0, 1, 2], "task": 0},
        {"round": 4, "kind": "task", "clients": [0], "task": 1},
        {"round": 5, "kind": "task", "clients": "all", "task": 1},
        {"round": 5, "kind": "drift", "clients": [1], "type": "noise"},
        {"round": 6, "kind": "task", "clients": [1, 2], "task": 1},
        {"round": 6, "kind": "task", "clients": [0], "task": 2},
    ]
    assert event_rounds(events, num_clients=3) == {
        "task": [1, 5, 6],
        "task (some clients)": [4],
        "drift": [5],
    }
    assert event_rounds(events)["task"] == [1, 4, 5, 6]
