"""Unlearning methods: functions of an `UnlearningContext`, called at each round with deletions.

A method receives the context (the round's deletion, the global model after the round's events,
the strategy and grid) and its options, and returns the new global arrays (None: unchanged).
`none` and `native` change nothing here (`native` relies on the strategy's `on_delete`, which
has already run); `finetune` and `ascent` are approximate; `retrain` is exact and lives in
`fedcl.unlearning.retrain`. A user's method is named by import path in `unlearning.method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from omegaconf import DictConfig

from fedcl.engine.audit import DeletionAudit
from fedcl.engine.checkpoint import client_states, load_strategy_state, strategy_state
from fedcl.engine.record_codec import decode_records, encode_records
from fedcl.errors import FedclError
from fedcl.scenario.scenario import Scenario
from fedcl.unlearning.ascent import ascend_on_clients


class UnlearningError(FedclError):
    """An unlearning method raised; the message names the method and the delete events."""


@dataclass
class UnlearningContext:
    """What a method is given at `server_round`, whose delete events (timeline indices
    `events`) removed `forget` (client -> its deleted sample ids of the tasks seen so far, the
    ones that can have been trained on). `arrays` are the global arrays after the round's events;
    the round has not trained yet, and the clients already hold no deleted data.

    `train_rounds` and `ascend` are the building blocks of the approximate methods; `rounds`
    and `audit` count what they did (every sample they train on is checked against deletions).
    """

    server_round: int
    events: tuple[int, ...]
    forget: dict[int, np.ndarray]
    arrays: ArrayRecord
    strategy: Any
    grid: Grid
    scenario: Scenario
    cfg: DictConfig
    audit: DeletionAudit
    rounds: int = 0  # training rounds the method ran
    log: dict[str, Any] = field(default_factory=dict)  # what the method reports (unlearning.jsonl)

    def train_rounds(self, arrays: ArrayRecord, rounds: int) -> ArrayRecord:
        """`rounds` rounds of the run's training from `arrays`, on what the clients hold now
        (the round's online clients, the round's seeds: each repeat draws alike); return the
        arrays. Only the global model changes: the strategy's and the clients' state (replay
        buffers, counters) are put back afterwards, and task-end hooks do not run."""
        from fedcl.engine import loop  # the loop imports this package

        if rounds <= 0:
            return arrays
        saved, why = strategy_state(self.strategy)
        if saved is None:
            raise RuntimeError(f"the strategy's state cannot be kept aside: {why}")
        saved = decode_records(encode_records({0: saved}))[0]  # a copy, not the live arrays
        clients = decode_records(client_states(self.grid))
        try:
            for _ in range(rounds):
                played = loop.train_round(
                    self.cfg,
                    self.strategy,
                    self.grid,
                    arrays,
                    self.scenario,
                    self.server_round,
                    self.audit,
                    task_end_hooks=False,
                )
                arrays = played.arrays
                self.rounds += 1
        finally:
            from fedcl.unlearning.replica import set_client_states

            load_strategy_state(self.strategy, saved)
            set_client_states(self.grid, clients)
        return arrays

    def ascend(self, arrays: ArrayRecord, *, lr: float, epochs: int, bound: float) -> ArrayRecord:
        """Bounded gradient ascent of the affected clients on their deleted samples
        (`fedcl.unlearning.ascent`); return the average of their ascended models."""
        arrays, answered = ascend_on_clients(
            self.grid, arrays, self.forget, self.server_round, lr=lr, epochs=epochs, bound=bound
        )
        self.log["ascent_clients"] = answered
        return arrays


Method = Callable[..., ArrayRecord | None]


def none(context: UnlearningContext) -> None:
    """Exclusion only: the deleted data is gone from every later view; the model is kept."""
    return None


def native(context: UnlearningContext) -> None:
    """The strategy's own exact removal, done by its `on_delete` hook with the round's events."""
    return None


def finetune(context: UnlearningContext, rounds: int = 2) -> ArrayRecord:
    """Fine-tune the global model on the retained data for `rounds` rounds."""
    return context.train_rounds(context.arrays, rounds)


def ascent(
    context: UnlearningContext,
    rounds: int = 2,
    lr: float = 0.01,
    epochs: int = 1,
    bound: float = 1.0,
) -> ArrayRecord:
    """Bounded gradient ascent on the forget set by the affected clients, then `rounds` rounds
    of fine-tuning on the retained data."""
    arrays = context.ascend(context.arrays, lr=lr, epochs=epochs, bound=bound)
    return context.train_rounds(arrays, rounds)


BUILT_IN: dict[str, Method] = {
    "none": none,
    "native": native,
    "finetune": finetune,
    "ascent": ascent,
}


def method_options(cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments the configured method takes from the `unlearning` section."""
    section = cfg.unlearning
    if section.method == "finetune":
        return {"rounds": section.rounds}
    if section.method == "ascent":
        return {
            "rounds": section.rounds,
            "lr": section.ascent_lr,
            "epochs": section.ascent_epochs,
            "bound": section.ascent_bound,
        }
    return dict(section.options) if ":" in section.method else {}
