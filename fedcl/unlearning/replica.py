"""A second engine beside the run: its own actors, grid and strategy on another scenario.

The oracle and `retrain`'s replays are replicas: they play rounds through the round loop's own
`train_round` and `apply_events`, so a round plays there exactly as it would in the run.
Client training draws only from (seed, client, round, task), and results do not depend on how
many actors there are, so a replica runs on one actor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict
from omegaconf import DictConfig

from fedcl.engine import strategy_calls
from fedcl.engine.actor import kill_actors
from fedcl.engine.audit import DeletionAudit
from fedcl.engine.checkpoint import Checkpoint, client_states, load_strategy_state
from fedcl.engine.events import apply_events
from fedcl.engine.flower_compat import make_run, node_id_of
from fedcl.engine.grid import RayGrid
from fedcl.engine.record_codec import decode_records
from fedcl.scenario.datasets import ArrayDataset
from fedcl.scenario.scenario import Scenario
from fedcl.strategies.base import ClientExtension, ContinualStrategy


@dataclass
class EngineParts:
    """What the run's engine is made of, to start replicas of it on other scenarios: the
    validated config, the resolved config as containers (`engine.vectorize` decided), the data,
    the strategy's client half and the run id."""

    cfg: DictConfig
    container: dict[str, Any]
    dataset: ArrayDataset
    extension: ClientExtension | None
    run_id: int


class Replica:
    """The run's engine on `scenario`, at the state of round 0 or of a checkpoint; `play` runs
    rounds. Close it (or use it as a context manager) to stop its actor."""

    def __init__(self, parts: EngineParts, scenario: Scenario) -> None:
        from fedcl.engine import loop  # the loop imports this package

        self.parts, self.scenario, self._loop = parts, scenario, loop
        cfg = parts.cfg
        # The run's actors hold the CPUs they asked for; the replica's one takes its turn on
        # them (the run waits while it plays), so it asks for none.
        container = {
            **parts.container,
            "engine": {**parts.container["engine"], "num_cpus_per_actor": 0},
        }
        factory = loop.actor_factory(
            container, parts.dataset, scenario, parts.run_id, parts.extension
        )
        self.actors = factory.start(1)
        self.grid = RayGrid(
            self.actors, node_id_of(np.arange(cfg.clients.num)), make_run(parts.run_id)
        )
        self._trained_before = False
        self.reset()

    def reset(self) -> None:
        """A fresh strategy (the run's, `sharded.build_run_strategy`; told `on_run_start`),
        audit and counters: the state of round 0 but for the clients' states, which `load` or
        `clear_clients` sets."""
        from fedcl.unlearning.sharded import build_run_strategy  # it imports this module

        cfg = self.parts.cfg
        self.strategy = build_run_strategy(self.parts.container, cfg)
        if isinstance(self.strategy, ContinualStrategy):
            info = self._loop.scenario_info(cfg, self.scenario, self.parts.dataset.num_classes)
            strategy_calls.notify(self.strategy, "on_run_start", 0, info)
        self.audit = DeletionAudit(self.scenario, None)
        self.round_seconds: list[float] = []  # each round trained, in order
        self.warm = self._trained_before

    def clear_clients(self) -> None:
        """Every client's state as before round 1 (empty)."""
        set_client_states(self.grid, {})

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the replica's actor."""
        kill_actors(self.grid.actors)

    def load(self, checkpoint: Checkpoint) -> ArrayRecord:
        """Take the state of `checkpoint` (strategy and every client); return its arrays."""
        if checkpoint.state["strategy"]["saved"]:
            load_strategy_state(self.strategy, checkpoint.strategy_state())
        set_client_states(self.grid, checkpoint.client_states())
        return checkpoint.arrays()

    def events(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Apply the events of `server_round` (their hooks); return the global arrays."""
        return apply_events(self.scenario, server_round, self.strategy, arrays, self.grid)[0]

    def train(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """Train `server_round` (after its events); return the new global arrays."""
        started = time.perf_counter()
        cfg = self.parts.cfg
        played = self._loop.train_round(
            cfg, self.strategy, self.grid, arrays, self.scenario, server_round, self.audit
        )
        self.round_seconds.append(time.perf_counter() - started)
        self._trained_before = True
        return played.arrays

    @property
    def rounds(self) -> int:
        """Rounds trained since the last `reset`."""
        return len(self.round_seconds)

    @property
    def seconds(self) -> float:
        """Seconds spent training them. A fresh actor's first round also pays its one-off
        warm-up (model, caches: over a second on a small model), which is not the round's cost:
        it counts as the median of the others'."""
        times = list(self.round_seconds)
        if not self.warm and len(times) > 1:
            times[0] = float(np.median(times[1:]))
        return float(sum(times))

    @property
    def warmup_s(self) -> float:
        """What `seconds` leaves out of the rounds' measured time (the fresh actor's warm-up)."""
        return float(sum(self.round_seconds)) - self.seconds

    def trained_ids(self, server_round: int) -> dict[int, np.ndarray]:
        """The ids each client trained on in `server_round` (if it was the last one trained)."""
        recorded, trained = self.audit.last_trained
        return trained if recorded == server_round else {}


def set_client_states(grid: RayGrid, states: dict[int, RecordDict]) -> None:
    """Make `states` every node's `Context.state` in `grid`'s actors: a node without an entry
    gets an empty state (whatever it held is from another history)."""
    held = decode_records(client_states(grid))
    grid.import_states({node: states.get(node, RecordDict()) for node in set(held) | set(states)})
