"""Observers of the round loop: they see each round's events and record, and never change them.

The run folder's recorder, the progress bar and the checkpointer are observers, as
pfl-research's callbacks are: the loop itself only runs rounds.
"""

from __future__ import annotations

import pickle
import sys
from typing import Any, Protocol

import ray
from flwr.app import ArrayRecord
from tqdm import tqdm

from fedcl.engine.grid import RayGrid
from fedcl.metrics.recorder import RunRecorder


class RoundObserver(Protocol):
    """Told about every applied event and every finished round, in order."""

    def on_events(self, server_round: int, entries: list[dict[str, Any]]) -> None:
        """The timeline entries applied before training in `server_round`."""

    def on_round_end(self, record: dict[str, Any], arrays: ArrayRecord, strategy: Any) -> None:
        """`record` (a metrics.jsonl line) is final; `arrays` are the round's global arrays."""

    def close(self) -> None:
        """The loop is over (finished or failed)."""


class RecorderObserver:
    """Writes events.jsonl and metrics.jsonl as the rounds go (flushed per line)."""

    def __init__(self, recorder: RunRecorder) -> None:
        self.recorder = recorder

    def on_events(self, server_round: int, entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            self.recorder.record_event(entry)

    def on_round_end(self, record: dict[str, Any], arrays: ArrayRecord, strategy: Any) -> None:
        self.recorder.record_round(record)

    def close(self) -> None:
        return None


class ProgressObserver:
    """A tqdm bar (round, task, average accuracy, current-task accuracy) and failure lines."""

    def __init__(self, rounds: int, show: bool) -> None:
        self.bar = tqdm(total=rounds, desc="fedcl", unit="round", disable=not show, file=sys.stderr)

    def on_events(self, server_round: int, entries: list[dict[str, Any]]) -> None:
        return None

    def on_round_end(self, record: dict[str, Any], arrays: ArrayRecord, strategy: Any) -> None:
        for failure in record["failures"]:
            self.bar.write(
                f"round {record['round']}: client {failure['node']} failed: {failure['reason']}"
            )
        task = record["task"]
        current = record["acc"].get(str(task), float("nan"))
        self.bar.set_postfix(task=task, acc=f"{record['avg_acc']:.3f}", cur=f"{current:.3f}")
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


class CheckpointObserver:
    """Every `every` rounds: global arrays, the strategy (if picklable), every client's state."""

    def __init__(self, recorder: RunRecorder, grid: RayGrid, every: int) -> None:
        self.recorder, self.grid, self.every = recorder, grid, every

    def on_events(self, server_round: int, entries: list[dict[str, Any]]) -> None:
        return None

    def on_round_end(self, record: dict[str, Any], arrays: ArrayRecord, strategy: Any) -> None:
        server_round = record["round"]
        if server_round % self.every:
            return
        client_states: dict[int, Any] = {}
        for states in ray.get([actor.export_states.remote() for actor in self.grid.actors]):
            client_states.update(states)
        try:
            strategy_state = pickle.dumps(strategy)
        except Exception:  # strategies holding lambdas or handles cannot be pickled
            strategy_state = None
        self.recorder.write_checkpoint(
            server_round,
            {
                "round": server_round,
                "arrays": {name: arrays[name].numpy() for name in arrays},
                "strategy": strategy_state,
                "client_states": client_states,
            },
        )

    def close(self) -> None:
        return None
