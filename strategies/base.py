"""fedcl's continual hooks for Flower strategies.

A continual strategy is a Flower `Strategy` that also subclasses `ContinualStrategy`; the round loop
calls these hooks at task boundaries, in addition to the usual configure/aggregate calls. Each hook
may talk to clients through `grid` (e.g. ask for activations) and may return new global arrays.
Stock Flower strategies have no hooks and run unchanged.
"""

from __future__ import annotations

from flwr.app import ArrayRecord
from flwr.serverapp import Grid


class ContinualStrategy:
    """Mixin with the task-boundary hooks the fedcl round loop calls; the defaults do nothing."""

    def on_task_start(
        self, server_round: int, task: int, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """Called before round `server_round`, the first round of `task`; may return new arrays."""
        return None

    def on_task_end(
        self, server_round: int, task: int, arrays: ArrayRecord, grid: Grid
    ) -> ArrayRecord | None:
        """Called after aggregation in `server_round`, the last round of `task`, before evaluation;
        may return new arrays."""
        return None
