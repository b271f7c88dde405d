"""Observers of the round loop: they see each round's events and record, and never change them.

The run folder's recorder, the progress bar and the checkpointer are observers, as
pfl-research's callbacks are: the loop itself only runs rounds.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, Protocol

import ray
from flwr.app import ArrayRecord
from tqdm import tqdm

from fedcl.engine.audit import DeletionAudit
from fedcl.engine.checkpoint import Snapshot, client_states, prune, write_checkpoint
from fedcl.engine.events import DELETED_IDS_KEY
from fedcl.engine.flower_compat import partition_of
from fedcl.engine.grid import RayGrid
from fedcl.metrics.recorder import RunRecorder

logger = logging.getLogger(__name__)


class RoundObserver(Protocol):
    """Told where the loop starts, then about every applied event and every finished round, in
    order."""

    def on_loop_start(
        self, first_round: int, init_acc: dict[str, float], audit: DeletionAudit
    ) -> None:
        """Before `first_round` (1, or the round after a resumed checkpoint's): the accuracy
        before any training and the run's deletion audit."""

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

    def on_loop_start(
        self, first_round: int, init_acc: dict[str, float], audit: DeletionAudit
    ) -> None:
        return None

    def on_events(self, server_round: int, entries: list[dict[str, Any]]) -> None:
        """Append each entry to events.jsonl; a delete entry's ids go to its `ids_file` first,
        so no line names a file that is not there."""
        for entry in entries:
            if DELETED_IDS_KEY in entry:
                self.recorder.write_deletion_ids(entry["ids_file"], entry[DELETED_IDS_KEY])
                entry = {k: v for k, v in entry.items() if k != DELETED_IDS_KEY}
            self.recorder.record_event(entry)

    def on_round_end(self, record: dict[str, Any], arrays: ArrayRecord, strategy: Any) -> None:
        self.recorder.record_round(record)

    def close(self) -> None:
        return None


class ProgressObserver:
    """A tqdm bar (round, task, average accuracy, current-task accuracy, updates aggregated of
    those sampled) and, while the bar shows, one line per lost update (at most `max_lines` a
    round) and one per round without any update."""

    def __init__(self, rounds: int, show: bool, max_lines: int = 5) -> None:
        self.show, self.max_lines = show, max_lines
        self.shown = {"acc": "-", "cur": "-"}  # the last evaluated round's figures
        self.bar = tqdm(total=rounds, desc="fedcl", unit="round", disable=not show, file=sys.stderr)

    def on_loop_start(
        self, first_round: int, init_acc: dict[str, float], audit: DeletionAudit
    ) -> None:
        self.bar.update(first_round - 1)  # a resumed run's bar starts where it stopped

    def on_events(self, server_round: int, entries: list[dict[str, Any]]) -> None:
        return None

    def on_round_end(self, record: dict[str, Any], arrays: ArrayRecord, strategy: Any) -> None:
        for line in round_lines(record, self.max_lines) if self.show else []:
            self.bar.write(line, file=sys.stderr)
        task = record["task"]
        if "acc" in record:  # eval.every: rounds not evaluated keep the last figures
            current = record["acc"].get(str(task), float("nan"))
            self.shown = {"acc": f"{record['avg_acc']:.3f}", "cur": f"{current:.3f}"}
        self.bar.set_postfix(
            task=task,
            **self.shown,
            ok=f"{record['replies']}/{record['sampled']}",
        )
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


def round_lines(record: dict[str, Any], max_lines: int = 5) -> list[str]:
    """What a round's record says about lost updates, as lines for a person: one per failure (the
    first `max_lines`, then a count) and, for a round without any update, one saying so."""
    server_round, failures = record["round"], record["failures"]
    lines = [
        f"round {server_round}: client {partition_of(f['node'])} (node {f['node']}) failed: "
        f"{f['reason']}"
        for f in failures[:max_lines]
    ]
    if len(failures) > max_lines:
        lines.append(
            f"round {server_round}: {len(failures) - max_lines} more clients failed "
            "(see failures in metrics.jsonl)"
        )
    if record.get("no_updates"):
        why = record.get("discarded") or record.get("skipped") or f"{len(failures)} failed"
        lines.append(f"round {server_round}: no client update was aggregated ({why})")
    return lines


class CheckpointObserver:
    """Writes the run's complete state (`fedcl.engine.checkpoint`) after a round: every `every`
    rounds while the last checkpoint took at most `max_overhead` of the time since it, and
    whenever `every_s` seconds have passed since the last one (0 turns a rule off); keeps the
    `keep` newest. A checkpoint that fails to be written is logged and the run goes on (the
    previous one stays good)."""

    def __init__(
        self,
        recorder: RunRecorder,
        grid: RayGrid,
        settings: Mapping[str, Any],
        vectorize: str,
    ) -> None:
        self.recorder, self.grid, self.vectorize = recorder, grid, vectorize
        self.every, self.every_s = settings["every"], settings["every_s"]
        self.max_overhead, self.keep = settings["max_overhead"], settings["keep"]
        self.init_acc: dict[str, float] = {}
        self.audit: DeletionAudit | None = None  # given by on_loop_start
        self.last = time.monotonic()  # when the last checkpoint was done
        self.cost = 0.0  # how long it took
        self.warned = False

    def on_loop_start(
        self, first_round: int, init_acc: dict[str, float], audit: DeletionAudit
    ) -> None:
        self.init_acc, self.audit, self.last = init_acc, audit, time.monotonic()

    def on_events(self, server_round: int, entries: list[dict[str, Any]]) -> None:
        return None

    def on_round_end(self, record: dict[str, Any], arrays: ArrayRecord, strategy: Any) -> None:
        server_round = record["round"]
        started = time.monotonic()
        since = started - self.last
        by_rounds = self.every > 0 and server_round % self.every == 0
        cheap = self.max_overhead <= 0 or self.cost <= self.max_overhead * since
        by_time = self.every_s > 0 and since >= self.every_s
        if not ((by_rounds and cheap) or by_time):
            return
        self.recorder.sync()  # the checkpoint's rounds must be in metrics.jsonl on disk first
        try:
            written = write_checkpoint(
                self.recorder.out_dir,
                Snapshot(
                    server_round,
                    arrays,
                    strategy,
                    client_states(self.grid),
                    self.init_acc,
                    self.audit.state_dict() if self.audit is not None else {},
                    self.vectorize,
                ),
            )
        except (OSError, ray.exceptions.RayError) as exc:
            logger.warning("checkpoint of round %d not written: %s", server_round, exc)
            return
        prune(self.recorder.out_dir, self.keep)
        self.last = time.monotonic()
        self.cost = self.last - started
        if written.unsaved_strategy and not self.warned:
            self.warned = True
            logger.warning("these checkpoints cannot resume the run: %s", written.unsaved_strategy)

    def close(self) -> None:
        return None
