"""The validation split: a share of each task's training data held out, stratified by class.

Held-out samples are removed from the task before it is split over the clients, so no client
holds them, trains on them, replays them or mixes them in; the driver scores the global model on
them beside the test data (`val_acc` in metrics.jsonl). Their ids index the training arrays, the
test set's the test arrays: the two never share a sample.
"""

from __future__ import annotations

import numpy as np

__all__ = ["stratified_holdout"]


def stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A bool mask over `labels`, True for the samples held out.

    Each class c with n_c samples gives round(fraction · n_c) of them, drawn without replacement
    from `rng` (the only source of randomness), but at least 1 when fraction > 0 and n_c >= 2, and
    never all n_c (a class keeps at least one training sample). Classes are drawn in increasing
    order, so the same generator state gives the same mask. ``fraction == 0`` holds out nothing.

    Raises ValueError unless 0 <= fraction < 1.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    held = np.zeros(len(labels), dtype=bool)
    if fraction == 0:
        return held
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(max(int(round(fraction * len(members))), 1), len(members) - 1)
        if count > 0:
            held[rng.choice(members, count, replace=False)] = True
    return held
