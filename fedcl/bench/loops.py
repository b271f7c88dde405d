"""The two in-process references fedcl is measured against, plain torch on one core.

- The *lean loop*, the compute limit: one reused module and optimizer; every client's batches are
  sliced once, up front, from preloaded tensors; per client the global weights are copied into the
  module's parameters, SGD runs, and the weighted parameters are added to a running sum.
- The *naive loop*, what a researcher writes first: a deep copy of the global model per client, a
  DataLoader, state-dict copies and FedAvg over the list of state dicts.

Both go through each client's samples in the same fixed order and weight clients by their sample
counts, so from the same start they compute the same global model (up to float rounding).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

Batch = tuple[torch.Tensor, torch.Tensor]


def sgd_epochs(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[Batch], epochs: int
) -> None:
    """Cross-entropy SGD on `batches`, in order, `epochs` times (the training every engine does)."""
    model.train()
    for _ in range(epochs):
        for inputs, targets in batches:
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def slice_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[Batch]:
    """Consecutive batches of (x, y) as views (no copies)."""
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


class LeanLoop:
    """FedAvg with one reused module and optimizer over batches sliced once from preloaded data.

    `x` has shape (clients, samples, *input_shape), `y` (clients, samples).
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int,
        lr: float,
        epochs: int = 1,
    ) -> None:
        self.model = model
        self.params = list(model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=lr)
        self.epochs = epochs
        self.batches = [slice_batches(x[c], y[c], batch_size) for c in range(len(x))]
        self.sizes = [len(y[c]) for c in range(len(y))]
        self.global_params = [p.detach().clone() for p in self.params]
        self.sums = [torch.zeros_like(p) for p in self.global_params]

    def run_round(self, clients: Iterable[int]) -> None:
        """Train every client in `clients` from the global model; their weighted mean becomes it."""
        for total in self.sums:
            total.zero_()
        weight = 0
        for client in clients:
            with torch.no_grad():
                for param, value in zip(self.params, self.global_params, strict=True):
                    param.copy_(value)
            sgd_epochs(self.model, self.optimizer, self.batches[client], self.epochs)
            size = self.sizes[client]
            with torch.no_grad():
                for total, param in zip(self.sums, self.params, strict=True):
                    total.add_(param, alpha=size)
            weight += size
        if weight:
            for value, total in zip(self.global_params, self.sums, strict=True):
                torch.div(total, weight, out=value)

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model as a state dict (parameter names to tensors)."""
        names = [name for name, _ in self.model.named_parameters()]
        return {name: value.clone() for name, value in zip(names, self.global_params, strict=True)}


class NaiveLoop:
    """FedAvg as a researcher first writes it: a model copy, an optimizer and a DataLoader per
    client, state-dict copies, and the average taken over the list of state dicts."""

    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int,
        lr: float,
        epochs: int = 1,
    ) -> None:
        self.global_model = model
        self.x, self.y = x, y
        self.batch_size, self.lr, self.epochs = batch_size, lr, epochs

    def train_client(self, client: int) -> tuple[dict[str, torch.Tensor], int]:
        """Train a copy of the global model on `client`'s data; return its state and size."""
        local = copy.deepcopy(self.global_model)
        optimizer = torch.optim.SGD(local.parameters(), lr=self.lr)
        data = TensorDataset(torch.tensor(self.x[client]), torch.tensor(self.y[client]))
        loader = DataLoader(data, batch_size=self.batch_size, shuffle=False)
        local.train()
        for _ in range(self.epochs):
            for inputs, targets in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(local(inputs), targets)
                loss.backward()
                optimizer.step()
        return copy.deepcopy(local.state_dict()), len(data)

    def run_round(self, clients: Iterable[int]) -> None:
        """Train every client in `clients`; load the sample-weighted mean of their states."""
        results = [self.train_client(int(c)) for c in clients]
        if not results:
            return
        total = sum(size for _, size in results)
        average = {
            key: sum(state[key] * size for state, size in results) / total for key in results[0][0]
        }
        self.global_model.load_state_dict(average)

    def global_state(self) -> dict[str, torch.Tensor]:
        """The global model as a state dict."""
        return {k: v.clone() for k, v in self.global_model.state_dict().items()}
