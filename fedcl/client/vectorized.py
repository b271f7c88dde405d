"""Vectorized virtual clients: train several clients of a round at once.

`train_clients_vectorized` stacks one copy of the model's parameters per client and runs every
client's SGD step together: for a model that is a chain of layers `fedcl.client.batched` knows
(fedcl's MLP and CNN among them), as batched layers under plain autograd; for any other, as
`vmap` of `grad_and_value` over `functional_call` (slower: functorch's per-operation dispatch
costs more than these small layers' arithmetic). Each client gets
exactly the batches, loss and SGD update that `train_local` would give it from the same starting
weights; only the floating-point summation order differs (see the function's docstring for the
tolerance). `can_vectorize` says whether a model qualifies, `vectorization_gain` measures whether it
pays on this machine.
"""

from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedcl.client.batched import BatchedForward, batched_forward, batched_loss_step
from fedcl.client.training import TrainStats, train_local

# Modules whose training-mode forward updates state or draws random numbers: per-client buffers
# or per-client random streams would be needed to match `train_local`.
_RANDOM: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, nn.RReLU)
_STATEFUL_OR_RANDOM: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, *_RANDOM)

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientBatchData:
    """One client's training data for a round, as `train_local` takes it."""

    x: np.ndarray  # (n, ...) inputs
    y: np.ndarray  # (n,) int64 targets
    seed: int  # the `seed` train_local would get: batch order
    class_mask: np.ndarray | None = None  # (n, classes) bool, allowed classes; None: all


@dataclass(frozen=True)
class VectorizedResult:
    """One client's outcome: its trained weights and what `train_local` would have reported."""

    state: dict[str, torch.Tensor]  # same keys and order as model.state_dict(), on the CPU
    stats: TrainStats


@dataclass(frozen=True)
class _Schedule:
    """Every client's batches, as padded global row indices into the concatenated data."""

    rows: torch.Tensor  # (K, S, B) int64 rows of the concatenated inputs; padding repeats a row
    real: torch.Tensor  # (K, S, B) bool, False on padding
    counts: torch.Tensor  # (K, S) real rows per step (float, divides the summed loss)
    active: list[int]  # per step: clients 0..active-1 take it (clients sorted by steps, desc)
    width: list[int]  # per step: rows per padded batch (always `batch_size`, see `_schedule`)


@dataclass(frozen=True)
class _Plan:
    """One client's batches as `train_local` draws them: per epoch a permutation of its rows (the
    last one cut where `max_steps` ends), consecutive `batch_size` slices of it being the
    batches."""

    orders: list[torch.Tensor]
    steps: int

    def stats(self, n: int, total_loss: float) -> TrainStats:
        """What `train_local` reports for this plan on n rows, given the summed loss."""
        whole = len(self.orders[0]) == n  # a whole epoch uses every row
        used = np.arange(n) if whole else np.sort(self.orders[0].numpy())
        examples = sum(len(order) for order in self.orders)
        return TrainStats(total_loss / self.steps, self.steps, examples, used)


def _plan(n: int, seed: int, epochs: int, batch_size: int, max_steps: int | None) -> _Plan:
    """The batches `train_local` draws for n rows: one generator, a fresh permutation per epoch,
    stopping after `max_steps` batches."""
    generator = torch.Generator().manual_seed(seed)
    per_epoch = -(-n // batch_size)
    orders: list[torch.Tensor] = []
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        if max_steps is not None and steps + per_epoch >= max_steps:
            take = max_steps - steps
            orders.append(order[: take * batch_size])
            return _Plan(orders, max_steps)
        orders.append(order)
        steps += per_epoch
    return _Plan(orders, steps)


def _schedule(plans: list[_Plan], offsets: list[int], batch_size: int) -> _Schedule:
    """Pad the batches of clients (sorted by step count, descending) into one index tensor."""
    clients, steps = len(plans), plans[0].steps
    rows = torch.tensor(offsets, dtype=torch.int64)[:, None].repeat(1, steps * batch_size)
    real = torch.zeros(clients, steps * batch_size, dtype=torch.bool)
    for k, plan in enumerate(plans):
        start = 0  # the epoch's first slot: every epoch starts a new batch
        for order in plan.orders:
            place = torch.arange(len(order))
            slots = start + place  # an epoch's batches are consecutive slices of its order
            rows[k, slots] = order + offsets[k]  # padding points at a real row: finite logits
            real[k, slots] = True
            start += -(-len(order) // batch_size) * batch_size
    rows = rows.view(clients, steps, batch_size)
    real = real.view(clients, steps, batch_size)
    counts = real.sum(2).to(torch.float32)
    taken = [plan.steps for plan in plans]
    active = [sum(t > s for t in taken) for s in range(steps)]
    # Every batch is padded to the full batch size, not to the widest batch of the step: then a
    # client's arithmetic has the same shapes whichever clients it is trained with, so its result
    # does not depend on how clients are spread over actors.
    width = [batch_size] * steps
    return _Schedule(rows, real, counts, active, width)


def _split_state(model: nn.Module) -> tuple[Tensors, Tensors]:
    """(trainable parameters, everything else functional_call needs: frozen params, buffers)."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    constants = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    constants.update({n: b.detach() for n, b in model.named_buffers()})
    return trainable, constants


def _loss_fn(
    model: nn.Module, constants: Tensors, anchor: Tensors, proximal_mu: float
) -> Callable[..., torch.Tensor]:
    """One client's loss on one padded batch, as train_local computes it on the real rows."""

    def loss(
        params: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        real: torch.Tensor,
        count: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        logits = functional_call(model, (params, constants), (x,))
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        per_row = F.cross_entropy(logits, y, reduction="none")
        value = torch.where(real, per_row, 0.0).sum() / count
        if proximal_mu > 0:
            drift = sum((params[n] - anchor[n]).pow(2).sum() for n in params)
            value = value + 0.5 * proximal_mu * drift
        return value

    return loss


def _state_dict(model: nn.Module, trained: Tensors) -> dict[str, torch.Tensor]:
    """`trained` laid out as model.state_dict() (tied parameters under each of their names)."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        name = names.get(id(value))
        source = trained[name] if name in trained else value.detach()
        state[key] = source.detach().to("cpu", copy=True)
    return state


@dataclass(frozen=True)
class StackedResult:
    """Every client's outcome of `train_clients_stacked`, stacked: row k is client k."""

    params: Tensors  # trainable parameter name -> (K, *shape), on the training device
    stats: list[TrainStats]


def train_clients_vectorized(
    model: nn.Module,
    datasets: Sequence[ClientBatchData],
    **settings: Any,
) -> list[VectorizedResult]:
    """Train one copy of `model` per entry of `datasets`, all at once; `model` is left unchanged.

    Client k ends where `train_local(copy_of_model, x_k, y_k, seed=seed_k,
    class_mask=class_mask_k, ...)` with the same keyword arguments would: the same batches (and
    last partial batch) from `seed_k`, plain SGD with weight decay and momentum as torch.optim.SGD,
    the FedProx term around the starting weights, the class mask, `max_steps`. A client whose
    batches have run out is not touched (no weight decay, no momentum step); one with no data comes
    back unchanged with zero steps. Batches are padded to `batch_size`; padded rows do not count
    in the loss, and a client's result does not depend on which other clients it is trained with.

    Batching the matrix products makes sums run in another order than in `train_local`: the
    results agree to rounding, not bitwise. In float32, weights typically differ by ≤ 1e-6 and
    losses by ≤ 1e-6 after tens of steps at lr ≤ 0.1 (tests hold them to 1e-5); in float64 by
    ≤ 1e-15. A rounding difference can now and then flip a ReLU or max-pool choice on a near-tie,
    which shows as an isolated larger weight difference (seen: 4e-4 in a 1-D CNN after 8 steps
    at lr 0.1), the ordinary sensitivity of SGD, not a different algorithm. Steps, examples and
    rows used agree exactly.

    Keyword settings are those of `train_clients_stacked`. Results come back on the CPU in the
    order of `datasets`.
    """
    stacked = train_clients_stacked(model, datasets, **settings)
    return [
        VectorizedResult(_state_dict(model, {n: p[k] for n, p in stacked.params.items()}), stats)
        for k, stats in enumerate(stacked.stats)
    ]


def train_clients_stacked(
    model: nn.Module,
    datasets: Sequence[ClientBatchData],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    max_steps: int | None = None,
    device: str = "cpu",
) -> StackedResult:
    """`train_clients_vectorized`'s training, with the trained parameters left stacked (row k:
    client k of `datasets`) rather than copied out per client: what a caller that reduces over
    clients (sums, screens) wants. `model` is left unchanged.

    Needs a model `can_vectorize` accepts (raises ValueError on one it rejects without a probe).
    """
    reason, forward = _traits(model)
    if reason is not None:
        raise ValueError(f"cannot train this model vectorized: {reason}")
    trainable, constants = _split_state(model)
    plans = [
        _plan(len(d.x), d.seed, epochs, batch_size, max_steps) if len(d.x) else None
        for d in datasets
    ]
    # Sorted by steps taken (descending), the clients still training at step s are a prefix:
    # every step works on views params[:active], no gather or scatter.
    order = sorted((k for k, plan in enumerate(plans) if plan), key=lambda k: -plans[k].steps)
    params, total_loss = _train_stacked(
        model,
        forward,
        trainable,
        constants,
        [datasets[k] for k in order],
        [plans[k] for k in order],
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        proximal_mu=proximal_mu,
        device=device,
    )
    # Back to the order of `datasets`; a client without data keeps the starting weights.
    position = {k: i for i, k in enumerate(order)}
    if len(order) == len(datasets) and order == sorted(order):
        stacked = params
    else:
        rows = [position.get(k, len(order)) for k in range(len(datasets))]
        index = torch.tensor(rows, device=device)
        stacked = {
            n: torch.cat([params[n], trainable[n].to(device).unsqueeze(0)]).index_select(0, index)
            if params
            else trainable[n].to(device).unsqueeze(0).expand(len(datasets), *trainable[n].shape)
            for n in trainable
        }
    stats = [
        plan.stats(len(data.x), float(total_loss[position[k]]))
        if plan
        else TrainStats(0.0, 0, 0, np.zeros(0, dtype=np.int64))
        for k, (plan, data) in enumerate(zip(plans, datasets, strict=True))
    ]
    return StackedResult(stacked, stats)


def stacked_state(model: nn.Module, stacked: Tensors, clients: int) -> dict[str, torch.Tensor]:
    """The (clients, *shape) tensors laid out as model.state_dict(): trained parameters from
    `stacked`, frozen parameters and buffers (unchanged by training) broadcast from `model`."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        name = names.get(id(value))
        if name in stacked:
            state[key] = stacked[name]
        else:
            state[key] = value.detach().unsqueeze(0).expand(clients, *value.shape)
    return state


def _train_stacked(
    model: nn.Module,
    forward: BatchedForward | None,
    trainable: Tensors,
    constants: Tensors,
    datasets: list[ClientBatchData],
    plans: list[_Plan],
    *,
    batch_size: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    proximal_mu: float,
    device: str,
) -> tuple[Tensors, torch.Tensor]:
    """The SGD loop over stacked parameters; clients sorted by steps, descending, none empty.
    Returns the (K, ...) trained parameters and each client's summed loss (float64)."""
    clients = len(datasets)
    if clients == 0:
        return {}, torch.zeros(0, dtype=torch.float64)
    sizes = [len(d.x) for d in datasets]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    plan = _schedule(plans, offsets, batch_size)
    inputs = torch.from_numpy(np.ascontiguousarray(np.concatenate([d.x for d in datasets])))
    targets = torch.from_numpy(np.concatenate([d.y for d in datasets]))
    masks = None
    if any(d.class_mask is not None for d in datasets):
        classes = next(d.class_mask.shape[1] for d in datasets if d.class_mask is not None)
        masks = torch.from_numpy(
            np.concatenate(
                [
                    d.class_mask if d.class_mask is not None else np.ones((n, classes), bool)
                    for d, n in zip(datasets, sizes, strict=True)
                ]
            )
        ).to(device)
    inputs, targets = inputs.to(device), targets.to(device)
    rows, real, counts = plan.rows.to(device), plan.real.to(device), plan.counts.to(device)

    params = {
        n: p.to(device).unsqueeze(0).expand(clients, *p.shape).clone() for n, p in trainable.items()
    }
    anchor = {n: p.to(device) for n, p in trainable.items()}
    constants = {n: c.to(device) for n, c in constants.items()}
    if forward is not None:
        step = batched_loss_step(forward, constants, anchor, proximal_mu)
    else:
        step = vmap(
            grad_and_value(_loss_fn(model, constants, anchor, proximal_mu)),
            in_dims=(0, 0, 0, 0, 0, 0 if masks is not None else None),
        )
    momentum_buffers: Tensors = {}
    total_loss = torch.zeros(clients, device=device, dtype=torch.float64)
    was_training = model.training
    model.train()
    try:
        for s, (active, width) in enumerate(zip(plan.active, plan.width, strict=True)):
            batch = rows[:active, s, :width]
            is_real = real[:active, s, :width]
            # Padded rows may be any class: allowing all keeps their (discarded) loss finite.
            mask = masks[batch] | ~is_real[..., None] if masks is not None else None
            grads, losses = step(
                {n: p[:active] for n, p in params.items()},
                inputs[batch],
                targets[batch],
                is_real,
                counts[:active, s],
                mask,
            )
            with torch.no_grad():
                total_loss[:active] += losses.double()
                for n, p in params.items():
                    weights, grad = p[:active], grads[n]
                    if weight_decay != 0:
                        grad = grad.add(weights, alpha=weight_decay)
                    if momentum != 0:
                        if s == 0:  # every client trains at step 0; torch.optim.SGD: buf = grad
                            momentum_buffers[n] = grad.clone()
                        else:
                            momentum_buffers[n][:active].mul_(momentum).add_(grad)
                        grad = momentum_buffers[n][:active]
                    weights.add_(grad, alpha=-lr)
    finally:
        model.train(was_training)
    return params, total_loss


_TRAITS: weakref.WeakKeyDictionary[nn.Module, tuple[str | None, BatchedForward | None]] = (
    weakref.WeakKeyDictionary()
)


def _traits(model: nn.Module) -> tuple[str | None, BatchedForward | None]:
    """(`_static_reason(model)`, `batched_forward(model)`'s forward or None: use vmap), worked
    out once per model object (an actor trains the same network object every round)."""
    if model not in _TRAITS:
        reason = _static_reason(model)
        forward = batched_forward(model)[0] if reason is None else None
        _TRAITS[model] = (reason, forward)
    return _TRAITS[model]


def can_vectorize(model: nn.Module, input_shape: Sequence[int] | None = None) -> str | None:
    """None if `train_clients_vectorized` can stand in for `train_local` on `model`, else why not.

    Rejects modules whose training forward updates buffers (batch norm) or draws random numbers
    (dropout: its random stream would differ from `train_local`'s). Given `input_shape` (one
    sample's shape), it also trains two tiny clients both ways and compares: that catches a
    forward vmap or functional_call cannot run, and any other randomness.
    """
    reason = _static_reason(model)
    if reason is not None or input_shape is None:
        return reason
    try:
        return _probe(model, tuple(input_shape))
    except Exception as error:  # any failure means: train this model sequentially
        return f"vectorized probe failed: {type(error).__name__}: {str(error)[:200]}"


def _static_reason(model: nn.Module) -> str | None:
    """Why `model`'s structure alone rules vectorizing out, or None."""
    for name, module in model.named_modules():
        stateful_norm = (
            isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats
        )
        if isinstance(module, _STATEFUL_OR_RANDOM) or stateful_norm:
            what = "draws random numbers" if isinstance(module, _RANDOM) else "updates buffers"
            return f"{name or 'the model'} ({type(module).__name__}) {what} in training"
    if len(list(model.named_modules(remove_duplicate=False))) != len(list(model.modules())):
        # functional_call swaps a shared submodule's tensors twice and leaves the copies in it.
        return "a submodule is registered under two names"
    return None


def _probe(model: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """Train two tiny clients vectorized and with train_local; None if they agree."""
    generator = torch.Generator().manual_seed(0)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    with torch.no_grad():
        classes = model(torch.zeros(1, *input_shape, dtype=dtype)).shape[-1]
    datasets = []
    for k, n in enumerate((5, 3)):
        x = torch.randn(n, *input_shape, generator=generator, dtype=dtype).numpy()
        y = torch.randint(classes, (n,), generator=generator).numpy()
        datasets.append(ClientBatchData(x, y, seed=k))
    knobs = {"epochs": 1, "batch_size": 2, "lr": 0.05, "momentum": 0.5}
    vectorized = train_clients_vectorized(model, datasets, **knobs)
    for data, result in zip(datasets, vectorized, strict=True):
        local = copy.deepcopy(model)
        stats = train_local(local, data.x, data.y, seed=data.seed, **knobs)
        expected = local.state_dict()
        if stats.steps != result.stats.steps or not all(
            torch.allclose(result.state[key], expected[key], atol=1e-4, rtol=1e-4)
            for key in expected
        ):
            return "vectorized training differs from train_local on a probe"
    return None


def vectorization_gain(
    model: nn.Module,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    batch_size: int,
    clients: int = 8,
    steps: int = 3,
    device: str = "cpu",
) -> float:
    """How much faster vectorized training is than sequential here: sequential / vectorized time.

    A runtime probe (wall clock, a fraction of a second for fedcl's models): `clients` synthetic
    clients of `steps` full batches each, trained by `train_clients_vectorized` and by a lean
    sequential loop (one reused module and optimizer, weights reloaded per client), best of
    three interleaved runs after a warm-up. The gain grows with the number of clients trained
    together, so pass the number an actor trains per round as `clients`. `model` is not changed
    and the global RNG is not touched.
    """
    generator = torch.Generator().manual_seed(0)
    n = batch_size * steps
    x = torch.randn(clients, n, *input_shape, generator=generator)
    y = torch.randint(num_classes, (clients, n), generator=generator)
    datasets = [ClientBatchData(x[k].numpy(), y[k].numpy(), seed=k) for k in range(clients)]
    worker = copy.deepcopy(model).to(device).train()
    start = {k: v.clone() for k, v in worker.state_dict().items()}
    optimizer = torch.optim.SGD(worker.parameters(), lr=0.01)
    xs, ys = x.to(device), y.to(device)

    def sequential() -> None:
        for k in range(clients):
            worker.load_state_dict(start)
            for batch in torch.arange(n).split(batch_size):
                loss = F.cross_entropy(worker(xs[k, batch]), ys[k, batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    def vectorized() -> None:
        train_clients_vectorized(
            model, datasets, epochs=1, batch_size=batch_size, lr=0.01, device=device
        )

    sequential_time, vectorized_time = _best_times((sequential, vectorized), device)
    return sequential_time / vectorized_time


def _best_times(works: Sequence[Callable[[], None]], device: str, repeats: int = 3) -> list[float]:
    """Shortest wall time of each of `works` after a warm-up; runs interleaved, so a burst of
    load from other processes on the machine hits all of them alike."""
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    best = [float("inf")] * len(works)
    for round_ in range(repeats + 1):
        for i, work in enumerate(works):
            synchronize()
            began = time.perf_counter()
            work()
            synchronize()
            if round_ > 0:  # round 0 warms up: allocator, vmap's first-call setup
                best[i] = min(best[i], time.perf_counter() - began)
    return [max(t, 1e-9) for t in best]
