"""Continual evaluation on the driver: the global model scored on the test data of every task seen
so far, under each concept the clients currently hold (evaluation follows drift)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord
from torch import nn

from fedcl.client.training import accuracy
from fedcl.scenario.concepts import Concept
from fedcl.scenario.datasets import ArrayDataset
from fedcl.scenario.scenario import Scenario
from fedcl.scenario.view import client_view


def concept_label(concept: Concept) -> str:
    """A readable name of a concept: 'original', or the drift events in force with severities."""
    if not concept:
        return "original"
    return "+".join(f"drift{span.event}@{severity:.2f}" for span, severity in concept)


@dataclass
class RoundScores:
    """One round's evaluation: accuracy per task (client-weighted over concepts) and details."""

    acc: dict[str, float]
    acc_next: dict[str, float]
    acc_by_concept: dict[str, dict[str, float]] = field(default_factory=dict)
    client_acc: dict[str, float] = field(default_factory=dict)
    val_acc: dict[str, float] = field(default_factory=dict)  # on the validation split, if any


class TaskEvaluator:
    """Scores a model's arrays on the test set of each task of `scenario`, under given concepts."""

    def __init__(
        self,
        dataset: ArrayDataset,
        scenario: Scenario,
        new_model: Callable[[], nn.Module],
        batch_size: int = 1024,
    ) -> None:
        self.x_test, self.y_test = dataset.x_test, dataset.y_test
        self.x_train, self.y_train = dataset.x_train, dataset.y_train  # validation samples
        self.num_classes = dataset.num_classes
        self.scenario = scenario
        self.model = new_model()
        self.batch_size = batch_size

    @property
    def has_validation(self) -> bool:
        """Whether the scenario holds out a validation split (`dataset.validation` > 0)."""
        held = self.scenario.validation_indices
        return bool(held) and any(len(ids) for ids in held)

    def evaluate(
        self,
        arrays: ArrayRecord,
        tasks: Iterable[int],
        concept: Concept = (),
        split: str = "test",
    ) -> dict[str, float]:
        """Accuracy of the model with `arrays` on each task in `tasks` under `concept`
        (str(task id) -> accuracy, keyed as in metrics.jsonl), on the test data, or with
        `split="validation"` on the samples held out of the task's training data."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        return {str(task): self._score(task, concept, split) for task in tasks}

    def _score(self, task: int, concept: Concept, split: str = "test") -> float:
        if split == "validation":
            # Training samples: drifts draw for them as for the training split.
            ids, x, y, drawn = (
                self.scenario.validation_indices[task],
                self.x_train,
                self.y_train,
                "train",
            )
        else:
            ids, x, y, drawn = self.scenario.test_indices[task], self.x_test, self.y_test, "test"
        tasks = np.full(len(ids), task, dtype=np.int64)
        view = client_view(self.scenario, x, y, ids, tasks, concept, split=drawn)
        mask = self.scenario.class_mask(view.tasks, self.num_classes)
        return accuracy(self.model, view.x, view.y, self.batch_size, class_mask=mask)

    def evaluate_round(
        self,
        arrays: ArrayRecord,
        server_round: int,
        clients: Sequence[int] | np.ndarray,
        next_task: int | None,
    ) -> RoundScores:
        """Score every seen task under each concept held by `clients`, weighting concepts by how
        many clients hold them; with several concepts, also per concept and per client (each
        client on its current task under its own concept)."""
        seen = self.scenario.seen_tasks(server_round)
        # Grouped with array passes: `clients` may be every one of a million registered clients.
        groups: dict[str, tuple[Concept, np.ndarray]] = {
            concept_label(concept): (concept, members)
            for concept, members in self.scenario.concept_groups(server_round, clients)
        }
        if not groups:
            groups["original"] = ((), np.zeros(0, dtype=np.int64))
        by_concept = {
            label: self.evaluate(arrays, seen, concept) for label, (concept, _) in groups.items()
        }
        weights = {label: max(1, len(members)) for label, (_, members) in groups.items()}
        total = sum(weights.values())
        acc = {
            str(t): sum(weights[g] * by_concept[g][str(t)] for g in groups) / total for t in seen
        }
        acc_next = self.evaluate(arrays, [next_task]) if next_task is not None else {}
        scores = RoundScores(acc, acc_next)
        if self.has_validation:
            val = {
                label: self.evaluate(arrays, seen, concept, split="validation")
                for label, (concept, _) in groups.items()
            }
            scores.val_acc = {
                str(t): sum(weights[g] * val[g][str(t)] for g in groups) / total for t in seen
            }
        if len(groups) > 1:
            scores.acc_by_concept = by_concept
            for label, (_, members) in groups.items():
                tasks = self.scenario.tasks_of(members, server_round)
                for client, task in zip(members.tolist(), tasks.tolist(), strict=True):
                    scores.client_acc[str(client)] = by_concept[label][str(task)]
        return scores


def mean(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN if none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
