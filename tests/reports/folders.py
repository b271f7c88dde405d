"""Hand-made run folders, written as `fedcl run` writes them, for tests that need no Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def write_run(
    folder: Path,
    summary: dict[str, Any] | None,
    records: list[dict[str, Any]],
    events: list[dict[str, Any]] = (),
    config: dict[str, Any] | None = None,
) -> Path:
    """A run folder: config.yaml, metrics.jsonl, events.jsonl, and summary.json unless None
    (an interrupted run)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = config or {
        "name": folder.name,
        "seed": 0,
        "rounds": len(records),
        "scenario": {"num_tasks": 2, "boundaries": "global", "stream": None},
        "clients": {"num": 4},
        "strategy": {"name": "fedavg"},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if events:
        (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def records(accs: list[dict[str, float]], tasks: list[int]) -> list[dict[str, Any]]:
    """metrics.jsonl lines with the given per-task accuracies and trained task per round."""
    return [
        {
            "round": i + 1,
            "task": task,
            "acc": acc,
            "avg_acc": sum(acc.values()) / len(acc),
            "round_s": 0.1 * (i + 1),
            "failures": [],
        }
        for i, (acc, task) in enumerate(zip(accs, tasks, strict=True))
    ]


ACCS = [{"0": 0.5}, {"0": 0.8}, {"0": 0.4, "1": 0.6}, {"0": 0.3, "1": 0.9}]
TASKS = [0, 0, 1, 1]
