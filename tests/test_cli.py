"""The CLI: user errors are one line on stderr, exit code 2, and leave no run folder behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcl.cli import main

QUICKSTART = str(Path(__file__).resolve().parents[1] / "simulations" / "quickstart.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=0.1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (["rounds=many"], "bad value for config key 'rounds'"),
        (["strategy.name=fedmagic"], "unknown strategy 'fedmagic'; valid: fedadagrad"),
        (["strategy.fraction=0.5"], "strategy 'fedavg' takes no argument 'fraction'; valid:"),
        (["strategy.target=no.such.Strategy"], "cannot import module 'no.such'"),
        (["dataset.name=mnist"], "mnist"),
        (["dataset.name=mnist", "dataset.root=/nonexistent/mnist"], "/nonexistent/mnist"),
        (["dataset.name=imagenet"], "unknown dataset 'imagenet'"),
        (["clients.partition=random"], "valid: iid, dirichlet, shards"),
        (["model.name=resnet"], "unknown model.name 'resnet'; valid: mlp, cnn"),
        (["client.app=no_such_module:app"], "client.app 'no_such_module:app'"),
        (["scenario.num_tasks=30"], "must not exceed rounds"),
        (["strategy.min_available_nodes=50"], "min_available_nodes=50 but the run has 10"),
    ],
)
def test_user_errors_are_one_line_and_leave_nothing(overrides, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", QUICKSTART, *overrides, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedcl: error: ") and err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"round": 1}\n')
    assert main(["run", QUICKSTART, "--out", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"round": 1}\n'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
