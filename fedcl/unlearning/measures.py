"""What is measured at a deletion: accuracy on the forget, retain and test sets, a loss-threshold
membership-inference AUC, and the L2 distance between two models.

* forget set: the deleted samples of the tasks seen so far, as their clients held them just
  before the deletion (their task's input transform and the client's concept then, e.g. swapped
  labels under drift);
* retain set: training samples of the tasks seen so far that are not deleted (stored labels);
* test set: test samples of the tasks seen so far;
* membership-inference AUC: the probability that a forget sample's loss is below an unseen test
  sample's of the same classes (Mann-Whitney), which is the AUC of the attack "member when the
  loss is under a threshold" over all thresholds; 0.5 means the losses tell nothing.

Sets are subsampled (seeded) to at most `MAX_SET` samples. The model is scored as a whole (no
task-incremental class masks).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord
from scipy.stats import rankdata
from torch import nn

from fedcl.scenario.datasets import ArrayDataset
from fedcl.scenario.scenario import Scenario
from fedcl.seeding import derive_rng
from fedcl.unlearning.data_absent import forget_sets

MAX_SET = 2000
BATCH = 1024


@dataclass
class EvalSets:
    """The (inputs, labels) of the forget, retain and test sets of one deletion, and the unseen
    test data the membership inference compares the forget set with."""

    forget: tuple[np.ndarray, np.ndarray]
    retain: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    unseen: tuple[np.ndarray, np.ndarray]


def eval_sets(
    scenario: Scenario,
    dataset: ArrayDataset,
    event_indices: Collection[int],
    server_round: int,
    seed: int,
) -> EvalSets:
    """The sets of the deletion by the delete events `event_indices` in `server_round`."""
    xs, ys = [], []
    for client, (ids, tasks) in forget_sets(scenario, event_indices, server_round).items():
        concept = scenario.concept(client, max(server_round - 1, 0))
        view = scenario.view(dataset.x_train, dataset.y_train, ids, tasks, concept)
        xs.append(view.x)
        ys.append(view.y)
    forget = _cap(_joined(xs, ys, dataset), seed, "forget", server_round)
    seen = scenario.seen_tasks(server_round) or [0]
    held = np.unique(np.concatenate([scenario.train.indices[t] for t in seen]))
    held = held[~scenario.deleted(held, server_round)]
    retain = _cap((dataset.x_train[held], dataset.y_train[held]), seed, "retain", server_round)
    test_x, test_y = [], []
    for task in seen:
        at = scenario.test_indices[task]
        test_x.append(scenario.task_inputs(dataset.x_test[at], task))
        test_y.append(dataset.y_test[at])
    test = _joined(test_x, test_y, dataset)
    same = np.isin(test[1], np.unique(forget[1]))
    unseen = (test[0][same], test[1][same]) if same.any() else test
    return EvalSets(
        forget,
        retain,
        _cap(test, seed, "test", server_round),
        _cap(unseen, seed, "unseen", server_round),
    )


def _joined(xs: list, ys: list, dataset: ArrayDataset) -> tuple[np.ndarray, np.ndarray]:
    if not xs:
        return dataset.x_train[:0], dataset.y_train[:0]
    return np.concatenate(xs), np.concatenate(ys)


def _cap(data: tuple[np.ndarray, np.ndarray], seed: int, name: str, server_round: int):
    x, y = data
    if len(y) <= MAX_SET:
        return x, y
    keep = np.sort(derive_rng(seed, "unlearning-eval", name, server_round).choice(len(y), MAX_SET))
    return x[keep], y[keep]


@torch.no_grad()
def sample_losses(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cross-entropy loss, correct) per sample of `model` on (x, y)."""
    model.eval()
    losses, correct = [], []
    inputs, targets = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    for xb, yb in zip(inputs.split(BATCH), targets.split(BATCH), strict=True):
        logits = model(xb).double()
        losses.append(nn.functional.cross_entropy(logits, yb, reduction="none"))
        correct.append(logits.argmax(1) == yb)
    if not losses:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return torch.cat(losses).numpy(), torch.cat(correct).numpy()


def mia_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """The loss-threshold attack's AUC: P(member loss < non-member loss), ties counting half
    (Mann-Whitney U / (m n)); NaN when either side is empty."""
    m, n = len(member_losses), len(nonmember_losses)
    if not m or not n:
        return float("nan")
    ranks = rankdata(-np.concatenate([member_losses, nonmember_losses]))
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def scores(model: nn.Module, arrays: ArrayRecord, sets: EvalSets) -> dict[str, float]:
    """`arrays` loaded into `model`: accuracy on each set and the membership-inference AUC."""
    model.load_state_dict(arrays.to_torch_state_dict())
    result: dict[str, float] = {}
    losses = {}
    for name in ("forget", "retain", "test", "unseen"):
        loss, correct = sample_losses(model, *getattr(sets, name))
        losses[name] = loss
        if name != "unseen":
            result[f"{name}_acc"] = float(correct.mean()) if len(correct) else float("nan")
    result["mia_auc"] = mia_auc(losses["forget"], losses["unseen"])
    return result


def l2_distance(a: ArrayRecord, b: ArrayRecord) -> float:
    """The L2 norm of the difference of two models' parameters (float64, all arrays)."""
    total = 0.0
    for name, array in a.items():
        diff = array.numpy().astype(np.float64) - b[name].numpy().astype(np.float64)
        total += float(np.sum(diff * diff))
    return float(np.sqrt(total))
