"""The deletion audit: which samples each client trained on per round, checked against deletions.

The run checks it as it goes (`DeletionAudit`, summary.json's `deletion_audit`); anyone can check
it again from the run folder alone (`recompute_audit`): events.jsonl names each delete event's
ids file (`deletions/event_XXXXX.npz`), and `trained_samples/round_XXXXX.npz` holds the ids each
client trained on per round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message

from fedcl.engine.flower_compat import partition_of
from fedcl.errors import FedclError
from fedcl.protocol import AUDIT_KEY, AUDIT_SAMPLE_IDS
from fedcl.scenario.scenario import NEVER, Scenario


def pop_trained_ids(replies: list[Message]) -> dict[int, np.ndarray]:
    """Take the trained-sample ids out of the train replies (strategies never see them); return
    them per client (partition id)."""
    trained = {}
    for reply in replies:
        if reply.has_error() or AUDIT_KEY not in reply.content:
            continue
        record = reply.content[AUDIT_KEY]  # not `config_records`: rebuilt on every access
        if not isinstance(record, ConfigRecord):
            continue
        trained[partition_of(reply.metadata.src_node_id)] = np.frombuffer(
            record[AUDIT_SAMPLE_IDS], dtype="<i8"
        ).copy()
        del reply.content[AUDIT_KEY]
    return trained


MAX_VIOLATIONS = 20  # summary.json lists the first ones only


class DeletionAudit:
    """Counts deleted samples used in training after their deletion round (must stay 0), and keeps
    a compact record of trained sample ids per round (`trained_samples/round_XXXXX.npz`)."""

    def __init__(self, scenario: Scenario, out_dir: Path | None) -> None:
        self.scenario = scenario
        self.deleted = int((scenario.deletion_round != NEVER).sum())
        self.used_after_delete = 0
        self.violations: list[dict[str, int]] = []
        # The latest round recorded and its ids per client (unlearning tracks first use by them).
        self.last_trained: tuple[int, dict[int, np.ndarray]] = (0, {})
        self.folder = out_dir / "trained_samples" if out_dir is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def record(self, server_round: int, trained: dict[int, np.ndarray]) -> None:
        """Check and store the ids each client trained on in `server_round`."""
        self.last_trained = (server_round, trained)
        # Client order, as trained_samples/ stores them, so recompute_audit lists the same ones.
        for client, ids in sorted(trained.items()):
            bad = int(self.scenario.deleted(ids, server_round).sum())
            if bad:
                self.used_after_delete += bad
                self.violations.append({"round": server_round, "client": client, "samples": bad})
        if self.folder is not None and trained:
            arrays = {f"client_{c}": ids.astype(np.int32) for c, ids in sorted(trained.items())}
            np.savez_compressed(self.folder / f"round_{server_round:05d}.npz", **arrays)

    def summary(self) -> dict[str, object]:
        """`deletion_audit` of summary.json."""
        return _audit_summary(self.deleted, self.used_after_delete, self.violations)

    def state_dict(self) -> dict[str, Any]:
        """What the audit counted so far, as plain JSON (for checkpoints); only the violations
        summary.json lists are kept."""
        return {
            "used_after_delete": self.used_after_delete,
            "violations": self.violations[:MAX_VIOLATIONS],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from the counts `state_dict` returned (the deleted total is the scenario's)."""
        self.used_after_delete = int(state["used_after_delete"])
        self.violations = [dict(v) for v in state["violations"]]


def _audit_summary(
    deleted: int, used_after_delete: int, violations: list[dict[str, int]]
) -> dict[str, object]:
    return {
        "deleted": deleted,
        "used_after_delete": used_after_delete,
        "violations": violations[:MAX_VIOLATIONS],
    }


def recompute_audit(run_dir: str | Path) -> dict[str, object]:
    """summary.json's `deletion_audit`, recomputed from the run folder alone: the delete events
    of events.jsonl, their ids files and `trained_samples/`.

    Equals the run's own audit for a run with `log.trained_samples` on. Raises `FedclError` when
    the folder lacks `trained_samples/` (the run had it off), an ids file is missing, or an ids
    file disagrees with its events.jsonl line.
    """
    run_dir = Path(run_dir)
    trained_folder = run_dir / "trained_samples"
    if not trained_folder.is_dir():
        raise FedclError(
            f"{run_dir} has no trained_samples/ (run with log.trained_samples=true to audit it)"
        )
    ids, rounds = _deleted_samples(run_dir)
    used_after_delete, violations = 0, []
    for path in sorted(trained_folder.glob("round_*.npz")):
        server_round = int(path.stem.split("_")[1])
        with np.load(path) as data:
            for name in sorted(data.files, key=lambda n: int(n.split("_")[1])):
                bad = int(_deleted_by(ids, rounds, data[name], server_round).sum())
                if bad:
                    used_after_delete += bad
                    client = int(name.split("_")[1])
                    violations.append({"round": server_round, "client": client, "samples": bad})
    return _audit_summary(len(ids), used_after_delete, violations)


def _deleted_samples(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every deleted sample id (ascending, distinct) and the round it was deleted in."""
    events_path = run_dir / "events.jsonl"
    lines = events_path.read_text().splitlines() if events_path.exists() else []
    all_ids, all_rounds = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for line in lines:
        entry = json.loads(line)
        if entry["kind"] != "delete":
            continue
        path = run_dir / entry["ids_file"]
        if not path.is_file():
            raise FedclError(
                f"{path} is missing (named by the delete event of round {entry['round']})"
            )
        with np.load(path) as data:
            event_ids = np.unique(data["ids"])
        if len(event_ids) != entry["deleted_samples"]:
            raise FedclError(
                f"{path} holds {len(event_ids)} distinct ids, events.jsonl says "
                f"{entry['deleted_samples']}"
            )
        all_ids.append(event_ids)
        all_rounds.append(np.full(len(event_ids), entry["round"], dtype=np.int64))
    ids, rounds = np.concatenate(all_ids), np.concatenate(all_rounds)
    # Each id is in one event's file (none counts an id again); the earliest round stands anyway.
    order = np.lexsort((rounds, ids))
    ids, rounds = ids[order], rounds[order]
    first = np.concatenate([[True], ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, bool)
    return ids[first], rounds[first]


def _deleted_by(
    ids: np.ndarray, rounds: np.ndarray, trained: np.ndarray, server_round: int
) -> np.ndarray:
    """Bool mask: which `trained` ids are among the deleted `ids` as of `server_round`."""
    if not len(ids):
        return np.zeros(len(trained), dtype=bool)
    at = np.minimum(np.searchsorted(ids, trained), len(ids) - 1)
    return (ids[at] == trained) & (rounds[at] <= server_round)
