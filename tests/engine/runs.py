"""Helpers for tests that run fedcl end to end and read the run folder back."""

from __future__ import annotations

import json
from pathlib import Path

import fedcl
from fedcl.metrics.system import MEASURED_RECORD_KEYS


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file, in order."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_with_actors(overrides: list[str], out: Path, actors: int) -> tuple[list[dict], list[dict]]:
    """Run with `actors` actors; return (events.jsonl, metrics.jsonl without timings, bytes and
    memory)."""
    fedcl.run(None, [*overrides, f"engine.num_actors={actors}"], out=out)
    records = read_jsonl(out / "metrics.jsonl")
    for record in records:
        record.pop("round_s")
        record.pop("train_s")
        for key in MEASURED_RECORD_KEYS:
            record.pop(key, None)
    events = read_jsonl(out / "events.jsonl") if (out / "events.jsonl").exists() else []
    return events, records
