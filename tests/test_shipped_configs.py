"""Every shipped experiment config (`simulations/*.yaml`) loads as written and runs two rounds.

To fit the suite's budget each run is shrunk by overrides, never by editing the file:
2 rounds (events moved into them, in order), at most 2 tasks, 1 local epoch, 1 actor,
sequential clients, no unlearning oracle. Configs with more than 20 clients keep 10
(scale_million has a million, the paper-scale FOT configs 125), and their generated datasets
shrink to match; a config that reads MNIST-format files from `dataset.root` gets small files
written in the real idx format. Everything else (scenario kind, partition, model, strategy and
its arguments, events, replay, drift) runs as shipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import fedcl
from fedcl.config import load_config
from fedcl.scenario.readers import write_idx

SIMULATIONS = Path(__file__).resolve().parents[1] / "simulations"
CONFIGS = sorted(SIMULATIONS.glob("*.yaml"))
MAX_CLIENTS = 20
IDX_FILES = {
    "train-images-idx3-ubyte": (600, 28, 28),
    "train-labels-idx1-ubyte": (600,),
    "t10k-images-idx3-ubyte": (200, 28, 28),
    "t10k-labels-idx1-ubyte": (200,),
}


def write_mnist_files(folder: Path) -> Path:
    """Small MNIST-format files (random images, every class present) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, shape in IDX_FILES.items():
        if "labels" in name:
            values = (np.arange(shape[0]) % 10).astype(np.uint8)
        else:
            values = rng.integers(0, 256, size=shape, dtype=np.uint8)
        write_idx(folder / name, values)
    return folder


def squeeze_events(events: list[dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """The events, their rounds (`round`, `until`) scaled from 1..`rounds` to 1..2, in order."""

    def scaled(server_round: int) -> int:
        return min(2, max(1, math.ceil(server_round * 2 / rounds)))

    squeezed = []
    for event in events:
        event = dict(event, round=scaled(event["round"]))
        if "until" in event:
            event["until"] = scaled(event["until"])
        squeezed.append(event)
    return squeezed


def shrink(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    """Overrides that make the config `raw` (as written) run two cheap rounds."""
    overrides = [
        "rounds=2",
        "train.epochs=1",
        "engine.num_actors=1",
        "engine.vectorize=off",
        "log.progress=false",
    ]
    scenario = raw.get("scenario") or {}
    if scenario.get("num_tasks", 5) > 2:
        overrides.append("scenario.num_tasks=2")
    if scenario.get("rounds_per_task") is not None:
        overrides.append("scenario.rounds_per_task=1")
    if scenario.get("stream") is not None:
        overrides.append("scenario.stream=null")
    clients = (raw.get("clients") or {}).get("num", 10)
    dataset = raw.get("dataset") or {}
    options = dataset.get("options") or {}
    if clients > MAX_CLIENTS:
        overrides.append("clients.num=10")
        # keep the samples per client the config asks for, on 10 clients
        if "train_per_class" in options:
            per_client = options["train_per_class"] * options.get("num_classes", 10) / clients
            overrides.append(f"dataset.options.train_per_class={math.ceil(per_client * 10)}")
            overrides.append("dataset.options.test_per_class=20")
    if raw.get("events"):
        overrides.append("events=" + json.dumps(squeeze_events(raw["events"], raw["rounds"])))
    if "num_samples" in options:
        overrides.append("dataset.options.num_samples=2000")
    if (raw.get("unlearning") or {}).get("oracle"):
        # the oracle is a second, full run: tests/unlearning covers it
        overrides.append("unlearning.oracle=false")
    if dataset.get("name") in ("mnist", "fashion_mnist") and dataset.get("root") is None:
        overrides.append(f"dataset.root={write_mnist_files(tmp_path / 'idx')}")
    return overrides


def test_every_shipped_config_loads_as_written() -> None:
    assert len(CONFIGS) >= 8
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.name and cfg.rounds >= 2, path.name


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_runs_two_rounds(path: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    overrides = shrink(raw, tmp_path)
    result = fedcl.run(str(path), *overrides, out=tmp_path / "run")
    summary = result.summary
    assert summary["status"] == "completed", summary.get("error")
    assert [r["round"] for r in result.records] == [1, 2]
    assert all(r["replies"] > 0 for r in result.records)
    final = result.records[-1]["acc"]
    assert summary["acc"] == pytest.approx(sum(final.values()) / len(final))
    if summary["bwt"] is None:  # a stream without a task-end matrix (asynchronous, recurring)
        history: dict[str, list[float]] = {}
        for record in result.records:
            for task, value in record["acc"].items():
                history.setdefault(task, []).append(value)
        forgetting = summary.get("forgetting_max", summary.get("forgetting"))
        drops = [max(history[t]) - final[t] for t in final]
        assert forgetting == pytest.approx(sum(drops) / len(drops))
    assert summary["deletion_audit"]["used_after_delete"] == 0
    # the strategy of the file ran, with the file's arguments
    written = load_config(tmp_path / "run" / "config.yaml")
    for key, value in raw["strategy"].items():
        assert written.strategy[key] == value, key
