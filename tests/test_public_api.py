"""The public API: a user's strategy with a client half, registration, hook order, errors, rules."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fedcl
import fedcl.client
import fedcl.testing
from fedcl.strategies import base
from tests.engine.runs import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ["rounds=8", "scenario.num_tasks=2", "clients.num=4", "engine.num_actors=2"]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples")}
    return subprocess.run(
        [sys.executable, "-m", "fedcl.cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def _penalties(out: Path) -> list[float]:
    return [r["train"]["ewc-penalty"] for r in read_jsonl(out / "metrics.jsonl")]


@pytest.mark.slow  # a CLI subprocess with its own Ray: outside CI (-m slow)
def test_example_strategy_runs_by_import_path_from_the_cli_with_its_client_half(tmp_path):
    out = tmp_path / "cli"
    done = _cli("run", "examples/momentum_ewc.yaml", *EXAMPLE, "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    records = read_jsonl(out / "metrics.jsonl")
    assert all(r["replies"] == 4 and not r["failures"] for r in records)
    # The EWC penalty is computed only by the client half, on both actors' clients, once a task
    # has been consolidated (task 1 starts at round 5).
    penalties = _penalties(out)
    assert penalties[:4] == [0.0] * 4 and all(p > 0 for p in penalties[4:])


def test_example_strategy_runs_from_fedcl_run_and_by_registered_name(tmp_path, ray_session):
    config = ROOT / "examples" / "momentum_ewc.yaml"
    by_path = fedcl.run(config, *EXAMPLE, out=tmp_path / "path", progress=False)
    by_name = fedcl.run(
        config,
        *EXAMPLE,
        out=tmp_path / "name",
        progress=False,
        imports=["momentum_ewc"],
        **{"strategy.target": None, "strategy.name": "momentum-ewc"},
    )
    assert by_path.summary["status"] == "completed"
    assert _penalties(tmp_path / "path") == _penalties(tmp_path / "name")
    assert by_path.summary["acc"] == by_name.summary["acc"]


def test_a_strategy_registered_in_a_user_module_is_listed():
    done = _cli("strategies", "--import", "momentum_ewc")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = lines.index("momentum-ewc  (momentum_ewc:MomentumEWC)")
    assert lines[at + 1].strip().startswith("FedAvg with server momentum")
    assert "ewc_lambda=100.0" in lines[at + 2]
    assert "fot  (fedcl.strategies.fot.strategy:FOT)" in lines


def test_hooks_fire_in_the_documented_order(tmp_path, ray_session):
    events = (
        "events=[{round: 2, kind: drift, clients: [1], type: noise},"
        " {round: 3, kind: delete, what: class, class: 2, clients: [0]}]"
    )
    result = fedcl.run(
        None,
        "clients.num=2",
        "rounds=4",
        "scenario.num_tasks=2",
        "strategy.target=tests.engine.hook_strategy.RecordingFedAvg",
        events,
        out=tmp_path / "run",
        progress=False,
    )
    calls = [c[:2] if c[0] in ("drift", "delete") else c for c in result.strategy.calls]
    train = [("configure_train",), ("aggregate_train",)]

    def trains(r):
        return [(name, r) for (name,) in train]

    expected = [
        ("run_start", 2, 2),
        ("client_task_start", 1, 1000, 0),
        ("client_task_start", 1, 1001, 0),
        ("task_start", 1, 0),
        *trains(1),
        ("drift", 2),
        *trains(2),
        ("client_task_end", 2, 1000, 0),
        ("client_task_end", 2, 1001, 0),
        ("task_end", 2, 0),
        ("client_task_start", 3, 1000, 1),
        ("client_task_start", 3, 1001, 1),
        ("task_start", 3, 1),
        ("delete", 3),
        *trains(3),
        *trains(4),
        ("client_task_end", 4, 1000, 1),
        ("client_task_end", 4, 1001, 1),
        ("task_end", 4, 1),
    ]
    assert calls == expected


def test_a_raising_hook_names_strategy_hook_and_round_and_keeps_the_rounds_done(tmp_path):
    out = tmp_path / "run"
    done = _cli(
        "run",
        "simulations/quickstart.yaml",
        "rounds=4",
        "scenario.num_tasks=2",
        "strategy.name=null",
        "strategy.target=tests.engine.hook_strategy.FailsAtTaskEnd",
        "--out",
        str(out),
        "--quiet",
    )
    assert done.returncode == 2
    message = done.stderr.strip().splitlines()
    assert message == [
        "fedcl: error: strategy FailsAtTaskEnd failed in on_task_end at round 2: KeyError: 'basis'"
    ]
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "on_task_end" in summary["error"]


def test_wrong_return_types_and_missing_methods_get_one_line(tmp_path, ray_session):
    with pytest.raises(fedcl.StrategyError, match=r"ReturnsList.aggregate_train at round 1 "):
        fedcl.run(
            None,
            "rounds=2",
            "scenario.num_tasks=1",
            "strategy.target=tests.engine.hook_strategy.ReturnsList",
            out=tmp_path / "a",
            progress=False,
        )
    with pytest.raises(fedcl.ConfigError, match="does not implement aggregate_evaluate"):
        fedcl.run(
            None,
            "strategy.target=tests.engine.hook_strategy.OnlyConfigures",
            out=tmp_path / "b",
            progress=False,
        )
    assert not (tmp_path / "b").exists()


def _fedcl_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n == "fedcl" or n.startswith("fedcl.")]


def test_strategies_import_nothing_private_from_the_engine_or_the_client_package():
    files = sorted((ROOT / "strategies").rglob("*.py")) + [ROOT / "examples" / "momentum_ewc.py"]
    private = {}
    for path in files:
        bad = [
            name
            for name in _fedcl_imports(path)
            if name.startswith("fedcl.engine") or name.startswith("fedcl.client.")
        ]
        if bad:
            private[str(path.relative_to(ROOT))] = bad
    assert private == {}
    # The rule is checked on real imports: the built-ins do use the public client package.
    assert "fedcl.client" in _fedcl_imports(ROOT / "strategies" / "fot" / "client.py")


def _public_objects():
    for module in (fedcl, fedcl.client, base, fedcl.testing):
        names = getattr(module, "__all__", None) or [
            n
            for n, o in vars(module).items()
            if not n.startswith("_")
            and (inspect.isclass(o) or inspect.isfunction(o))
            and o.__module__ == module.__name__
        ]
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj


def test_every_public_name_has_a_docstring():
    missing = [name for name, obj in _public_objects() if not inspect.getdoc(obj)]
    assert missing == []


def _python_blocks(path: Path) -> list[str]:
    text, blocks = path.read_text(), []
    for part in text.split("```python")[1:]:
        blocks.append(part.split("```")[0])
    return blocks


def test_the_guides_examples_run(tmp_path, ray_session, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(ROOT / "docs" / "writing-strategies.md")
    assert len(blocks) >= 3
    namespace: dict = {"ROOT": ROOT}
    for block in blocks:
        exec(compile(block, "writing-strategies.md", "exec"), namespace)  # noqa: S102
