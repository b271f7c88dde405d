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
    device: str = "cpu",
) -> TrainStats:
    """Train `model` in place with SGD on (x, y); batches and dropout draw only from `seed`.

    With `proximal_mu > 0` the FedProx term (mu/2)·||w − w_start||² is added to the loss, w_start
    being the weights the model had on entry (the global model). `class_mask` (n, classes) limits
    each sample's softmax to its task's classes (task-incremental learning). Training runs on
    `device` (e.g. "cuda" in an actor holding a GPU share); the model is returned on the CPU.
    The update is `torch.optim.SGD`'s (no dampening, no Nesterov), written out in `sgd_step`:
    the same arithmetic, without the optimizer's per-step bookkeeping (`zero_grad`, hooks,
    profiler records), which costs more than the step itself for the small models simulated
    clients train.
    """
    if len(x) == 0:
        return TrainStats(loss=0.0, steps=0, examples=0, rows_used=np.zeros(0, dtype=np.int64))
    on_cpu = torch.device(device).type == "cpu"
    if not on_cpu:  # Module.to walks every submodule even when nothing moves (~0.3 ms)
        model.to(device)
    inputs = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    targets = torch.from_numpy(y).to(device)
    masks = torch.from_numpy(class_mask).to(device) if class_mask is not None else None
    taken: list[torch.Tensor] = []  # the batches' rows, on the CPU
    losses: list[torch.Tensor] = []  # summed at the end: no host sync per step on a GPU
    params = [p for p in model.parameters() if p.requires_grad]
    buffers: list[torch.Tensor | None] = [None] * len(params)  # momentum buffers
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    generator = torch.Generator().manual_seed(seed)  # batch order: on the CPU, device-independent
    steps, examples = 0, 0
    model.train()
    cuda_devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        # Dropout and any other in-model randomness. Not torch.manual_seed: it also seeds every
        # CUDA device through a lazy call that records a stack trace (~2 ms per client).
        torch.default_generator.manual_seed(seed)
        if cuda_devices:
            torch.cuda.manual_seed_all(seed)
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for cpu_batch in order.split(batch_size):
                batch = cpu_batch if on_cpu else cpu_batch.to(device)
                logits = model(inputs[batch])
                if masks is not None:
                    logits = logits.masked_fill(~masks[batch], float("-inf"))
                loss = F.cross_entropy(logits, targets[batch])
                taken.append(cpu_batch)
                if anchor:
                    drift = sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
                    loss = loss + 0.5 * proximal_mu * drift
                grads = torch.autograd.grad(loss, params)
                sgd_step(
                    params, grads, buffers, lr=lr, momentum=momentum, weight_decay=weight_decay
                )
                losses.append(loss.detach())
                steps += 1
                examples += len(batch)
                if max_steps is not None and steps >= max_steps:
                    break
            if max_steps is not None and steps >= max_steps:
                break
    if not on_cpu:
        model.to("cpu")
    rows = torch.unique(torch.cat(taken)).numpy()  # sorted
    total_loss = sum(float(value) for value in torch.stack(losses).double().cpu())
    return TrainStats(total_loss / steps, steps, examples, rows)


@torch.no_grad()
def sgd_step(
    params: list[torch.Tensor],
    grads: tuple[torch.Tensor, ...],
    buffers: list[torch.Tensor | None],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """One step of `torch.optim.SGD` (dampening 0, no Nesterov) on `params` in place, with the
    same operations in the same order; `buffers` holds the momentum buffers (None before the
    first step, as the optimizer's fresh state)."""
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            buffer = buffers[i]
            if buffer is None:
                buffer = buffers[i] = torch.clone(grad).detach()
            else:
                buffer.mul_(momentum).add_(grad, alpha=1)
            grad = buffer
        param.add_(grad, alpha=-lr)


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
