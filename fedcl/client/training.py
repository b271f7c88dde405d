"""Local training and evaluation with plain torch: seeded, no framework in between."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TrainStats:
    """What one local training run did."""

    loss: float  # mean cross-entropy over the steps taken
    steps: int
    examples: int  # samples seen, counting repeats across epochs
    rows_used: np.ndarray  # sorted rows of the training set that were in some batch


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    max_steps: int | None = None,
    class_mask: np.ndarray | None = None,
) -> TrainStats:
    """Train `model` in place with SGD on (x, y); batches and dropout draw only from `seed`.

    With `proximal_mu > 0` the FedProx term (mu/2)·||w − w_start||² is added to the loss, w_start
    being the weights the model had on entry (the global model). `class_mask` (n, classes) limits
    each sample's softmax to its task's classes (task-incremental learning).
    """
    if len(x) == 0:
        return TrainStats(loss=0.0, steps=0, examples=0, rows_used=np.zeros(0, dtype=np.int64))
    inputs, targets = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    masks = torch.from_numpy(class_mask) if class_mask is not None else None
    used = torch.zeros(len(inputs), dtype=torch.bool)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    generator = torch.Generator().manual_seed(seed)
    total_loss, steps, examples = 0.0, 0, 0
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout and any other in-model randomness
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for batch in order.split(batch_size):
                logits = model(inputs[batch])
                if masks is not None:
                    logits = logits.masked_fill(~masks[batch], float("-inf"))
                loss = F.cross_entropy(logits, targets[batch])
                used[batch] = True
                if anchor:
                    drift = sum(
                        (p - a).pow(2).sum()
                        for p, a in zip(model.parameters(), anchor, strict=True)
                    )
                    loss = loss + 0.5 * proximal_mu * drift
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach())
                steps += 1
                examples += len(batch)
                if max_steps is not None and steps >= max_steps:
                    break
            if max_steps is not None and steps >= max_steps:
                break
    rows = torch.nonzero(used).flatten().numpy()
    return TrainStats(total_loss / steps, steps, examples, rows)


@torch.no_grad()
def predict(
    model: nn.Module, x: np.ndarray, batch_size: int = 1024, class_mask: np.ndarray | None = None
) -> np.ndarray:
    """Class predictions (argmax of the logits, over the allowed classes if masked) on `x`."""
    model.eval()
    inputs = torch.from_numpy(np.ascontiguousarray(x))
    if len(inputs) == 0:
        return np.zeros(0, dtype=np.int64)
    predictions = []
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start : start + batch_size])
        if class_mask is not None:
            allowed = torch.from_numpy(class_mask[start : start + batch_size])
            logits = logits.masked_fill(~allowed, float("-inf"))
        predictions.append(logits.argmax(1))
    return torch.cat(predictions).numpy()


def accuracy(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 1024,
    class_mask: np.ndarray | None = None,
) -> float:
    """Fraction of `x` that `model` classifies as `y` (NaN for an empty set)."""
    if len(y) == 0:
        return float("nan")
    return float((predict(model, x, batch_size, class_mask) == y).mean())
