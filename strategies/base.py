"""fedcl's continual hooks for Flower strategies.

A continual strategy is a Flower `Strategy` that also subclasses `ContinualStrategy`; the round loop
calls these hooks as the timeline unfolds, in addition to the usual configure/aggregate calls. A
hook may talk to clients through `grid` (e.g. ask for activations) and may return new global
arrays. Stock Flower strategies have no hooks and run unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid


@dataclass(frozen=True)
class DeletionRequest:
    """A data-deletion request as it reaches a strategy.

    `what` is "samples", "class" or "client"; `node_ids` the Flower nodes it touches; `sample_ids`
    the deleted training sample ids per node; `classes` the deleted class (for "class").
    """

    server_round: int
    what: str
    node_ids: tuple[int, ...]
    sample_ids: Mapping[int, np.ndarray] = field(default_factory=dict)
    classes: tuple[int, ...] = ()


@dataclass(frozen=True)
class DriftEvent:
    """A concept drift as it reaches a strategy: type, parameters, mode, and the nodes it hits."""

    server_round: int
    type: str
    node_ids: tuple[int, ...]
    params: Mapping[str, Any] = field(default_factory=dict)


class ContinualStrategy:
    """Mixin with the hooks the fedcl round loop calls; the defaults do nothing."""

    def on_task_start(
        self, server_round: int, task: int, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """Before round `server_round`, where every client starts `task`; may return new arrays."""
        return None

    def on_task_end(
        self, server_round: int, task: int, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """After aggregation in `server_round`, the last round of the global task `task`, before
        evaluation; may return new arrays."""
        return None

    def on_client_task_start(self, server_round: int, node_id: int, task: int) -> None:
        """Before round `server_round`, in which client `node_id` starts `task` (every boundary,
        global or per client)."""
        return None

    def on_client_task_end(self, server_round: int, node_id: int, task: int) -> None:
        """After round `server_round`, client `node_id`'s last round on `task` (it switches task,
        leaves, or the run ends)."""
        return None

    def on_drift(self, drift: DriftEvent, arrays: ArrayRecord, grid: Grid) -> ArrayRecord | None:
        """Before round `drift.server_round`, from which the drift applies; may return arrays."""
        return None

    def on_delete(
        self, deletion: DeletionRequest, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """Before round `deletion.server_round`, from which the data is gone from the clients;
        an unlearning strategy removes its contribution here and may return new arrays."""
        return None
