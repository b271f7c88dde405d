"""A tiny class-incremental run with deletions, for the unlearning tests."""

from __future__ import annotations

import json
from pathlib import Path

# Digits in 3 class-incremental tasks, 4 clients, 2 rounds a task. Class 1 (task 0, rounds 1-2,
# then in replay buffers) is deleted everywhere at round 4; client 2 deletes half its samples at
# round 5, which are first trained in round 1 too: the second rollback goes back past the first.
BASE = [
    "clients.num=4",
    "rounds=6",
    "scenario.num_tasks=3",
    "model.hidden=[32]",
    "train.epochs=1",
    "train.replay_size=20",
    "engine.num_actors=1",
    "log.progress=false",
]
EVENTS = (
    "events=[{round: 4, kind: delete, what: class, class: 1},"
    " {round: 5, kind: delete, clients: [2], what: samples, fraction: 0.5}]"
)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a .jsonl file, in order."""
    return [json.loads(line) for line in path.read_text().splitlines()]
