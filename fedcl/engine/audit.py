"""The deletion audit: which samples each client trained on per round, checked against deletions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Message

from fedcl.engine.flower_compat import partition_of
from fedcl.protocol import AUDIT_KEY, AUDIT_SAMPLE_IDS
from fedcl.scenario.scenario import NEVER, Scenario


def pop_trained_ids(replies: list[Message]) -> dict[int, np.ndarray]:
    """Take the trained-sample ids out of the train replies (strategies never see them); return
    them per client (partition id)."""
    trained = {}
    for reply in replies:
        if reply.has_error() or AUDIT_KEY not in reply.content:
            continue
        record = reply.content.config_records[AUDIT_KEY]
        trained[partition_of(reply.metadata.src_node_id)] = np.frombuffer(
            record[AUDIT_SAMPLE_IDS], dtype="<i8"
        ).copy()
        del reply.content[AUDIT_KEY]
    return trained


class DeletionAudit:
    """Counts deleted samples used in training after their deletion round (must stay 0), and keeps
    a compact record of trained sample ids per round (`trained_samples/round_XXXXX.npz`)."""

    def __init__(self, scenario: Scenario, out_dir: Path | None) -> None:
        self.scenario = scenario
        self.deleted = int((scenario.deletion_round != NEVER).sum())
        self.used_after_delete = 0
        self.violations: list[dict[str, int]] = []
        self.folder = out_dir / "trained_samples" if out_dir is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def record(self, server_round: int, trained: dict[int, np.ndarray]) -> None:
        """Check and store the ids each client trained on in `server_round`."""
        for client, ids in trained.items():
            bad = int(self.scenario.deleted(ids, server_round).sum())
            if bad:
                self.used_after_delete += bad
                self.violations.append({"round": server_round, "client": client, "samples": bad})
        if self.folder is not None and trained:
            arrays = {f"client_{c}": ids.astype(np.int32) for c, ids in sorted(trained.items())}
            np.savez_compressed(self.folder / f"round_{server_round:05d}.npz", **arrays)

    def summary(self) -> dict[str, object]:
        """`deletion_audit` of summary.json."""
        return {
            "deleted": self.deleted,
            "used_after_delete": self.used_after_delete,
            "violations": self.violations[:20],
        }
