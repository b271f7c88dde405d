"""Continual evaluation: the global model scored on the test data of each task, on the driver."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord
from torch import nn

from fedcl.client.training import accuracy
from fedcl.scenario.datasets import ArrayDataset
from fedcl.scenario.scenario import Scenario


class TaskEvaluator:
    """Scores a model's arrays on the test set of each task of `scenario`."""

    def __init__(
        self,
        dataset: ArrayDataset,
        scenario: Scenario,
        new_model: Callable[[], nn.Module],
        batch_size: int = 1024,
    ) -> None:
        self.x_test, self.y_test = dataset.x_test, dataset.y_test
        self.scenario = scenario
        self.model = new_model()
        self.batch_size = batch_size

    def evaluate(self, arrays: ArrayRecord, tasks: Iterable[int]) -> dict[str, float]:
        """Accuracy of the model with `arrays` on each task in `tasks` (str(task id) -> accuracy,
        keyed as in metrics.jsonl)."""
        self.model.load_state_dict(arrays.to_torch_state_dict())
        scores = {}
        for task in tasks:
            positions = self.scenario.test_indices[task]
            x = self.scenario.task_inputs(self.x_test[positions], task)
            scores[str(task)] = accuracy(self.model, x, self.y_test[positions], self.batch_size)
        return scores


def mean(values: Iterable[float]) -> float:
    """Mean of the finite values (NaN if none)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")
