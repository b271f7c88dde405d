"""Fisher-weighted model merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging",
NeurIPS 2022), for federated aggregation.

Each model k is read as a Laplace approximation N(θ_k, F_k⁻¹) of a posterior; with diagonal
Fishers, maximising Σ_k λ_k log p(θ | θ_k, F_k) has the per-coordinate closed form

    θ*(j) = Σ_k λ_k F_k(j) θ_k(j) / Σ_k λ_k F_k(j).

``diagonal_fisher`` estimates F on a client; ``fisher_merge`` is the server's merge. Plain torch and
numpy, no Flower, no Ray.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

FISHER_MODES = ("expected", "sampled", "empirical")


def _labels_and_weights(
    mode: str,
    probs: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator | None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The labels whose squared gradients enter F for one batch, each with per-example weights."""
    batch, num_classes = probs.shape
    if mode == "expected":
        return [
            (torch.full((batch,), c, dtype=torch.long, device=probs.device), probs[:, c])
            for c in range(num_classes)
        ]
    ones = torch.ones(batch, dtype=probs.dtype, device=probs.device)
    if mode == "sampled":
        device = probs.device if generator is None else generator.device
        drawn = torch.multinomial(probs.to(device), 1, generator=generator).squeeze(1)
        return [(drawn.to(probs.device), ones)]
    return [(labels.to(device=probs.device, dtype=torch.long), ones)]


def diagonal_fisher(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    mode: str = "expected",
    num_examples: int | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of a classifier, from per-example gradients.

    For the N = min(num_examples, len(x)) first examples (all when ``num_examples`` is None),
    with g(x, y) = ∂ log p_θ(y | x) / ∂θ:

    * ``"expected"``: F = (1/N) Σ_n Σ_y p_θ(y | x_n) g(x_n, y)², the exact expectation over the
      model's labels, as the official ``fisher.py`` (one gradient per class).
    * ``"sampled"``: F = (1/N) Σ_n g(x_n, ŷ_n)² with ŷ_n ~ p_θ(· | x_n) drawn with ``generator``;
      an unbiased one-sample estimate of ``"expected"``.
    * ``"empirical"``: F = (1/N) Σ_n g(x_n, y_n)² with the given labels ``y`` (the "empirical
      Fisher"; not the Fisher of the model's distribution).

    Per-example gradients come from ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``),
    ``batch_size`` examples at a time. The model runs in eval mode (as the official
    ``training=False``); its mode is restored afterwards. Its parameters are not changed.

    Parameters
    ----------
    model
        ``model(x)`` must return logits of shape (batch, num_classes).
    x, y
        Inputs (batch first) and, for ``"empirical"``, integer labels of the same length.
    generator
        Random source for ``"sampled"`` (the global one when None).

    Returns
    -------
    dict
        Parameter name → F, shaped and typed like the parameter, for every parameter with
        ``requires_grad``; other parameters are held fixed.
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"mode must be one of {FISHER_MODES}, got {mode!r}")
    if mode == "empirical" and y is None:
        raise ValueError('mode "empirical" needs the true labels y')
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_examples is not None:
        if num_examples < 1:
            raise ValueError(f"num_examples must be at least 1, got {num_examples}")
        x = x[:num_examples]
        y = None if y is None else y[:num_examples]
    n = x.shape[0]
    if n == 0:
        raise ValueError("diagonal_fisher needs at least one example")

    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        return {}
    constants = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    constants.update(model.named_buffers())

    def log_likelihood(
        p: dict[str, torch.Tensor], example: torch.Tensor, target: torch.Tensor
    ) -> torch.Tensor:
        logits = functional_call(model, (p, constants), (example.unsqueeze(0),))
        # target is one-hot, so this picks log p(y | x) without data-dependent indexing in vmap.
        return (torch.log_softmax(logits, dim=-1)[0] * target).sum()

    per_example_grads = vmap(grad(log_likelihood), in_dims=(None, 0, 0))

    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    was_training = model.training
    try:
        model.eval()
        for start in range(0, n, batch_size):
            xb = x[start : start + batch_size]
            with torch.no_grad():
                logits = functional_call(model, (params, constants), (xb,))
            if logits.dim() != 2:
                raise ValueError(
                    f"model must return logits (batch, num_classes), got {tuple(logits.shape)}"
                )
            probs = torch.softmax(logits, dim=-1)
            labels = None if y is None else y[start : start + batch_size]
            for targets, weights in _labels_and_weights(mode, probs, labels, generator):
                onehot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
                grads = per_example_grads(params, xb, onehot)
                for name, g in grads.items():
                    fisher[name] += torch.einsum("b,b...->...", weights, g**2)
    finally:
        model.train(was_training)
    return {name: value / n for name, value in fisher.items()}


def _check_tensor_list(
    what: str, arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]
) -> list[np.ndarray]:
    if len(arrays) != len(shapes):
        raise ValueError(f"{what} has {len(arrays)} tensors, expected {len(shapes)}")
    checked = []
    for j, (array, shape) in enumerate(zip(arrays, shapes, strict=True)):
        array = np.asarray(array, dtype=np.float64)
        if array.shape != shape:
            raise ValueError(f"{what} tensor {j} has shape {array.shape}, expected {shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{what} tensor {j} has non-finite entries")
        checked.append(array)
    return checked


def fisher_merge(
    params: Sequence[Sequence[np.ndarray]],
    fishers: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    *,
    floor: float = 1e-6,
    prior: tuple[Sequence[np.ndarray], Sequence[np.ndarray], float] | None = None,
) -> list[np.ndarray]:
    """Fisher-weighted average of the clients' models, optionally anchored to the old global one.

    Per coordinate j, with λ_k = w_k / Σ w the normalised client weights and
    F̃_k = max(F_k, floor):

        θ*(j) = [Σ_k λ_k F̃_k(j) θ_k(j) + γ F_old(j) θ_old(j)] / [Σ_k λ_k F̃_k(j) + γ F_old(j)]

    where the γ terms appear only when ``prior = (θ_old, F_old, γ)`` is given: the continual
    variant also merges the previous global model with its Fisher accumulated on old tasks
    (an EWC-like anchor). Equal F_k give exactly the λ-weighted average.

    The official ``_merge_with_coeffs`` floors only the first ("target") model's Fisher, so that
    coordinates no other model cares about fall back to the target; federated averaging has no
    target model, so every client is floored, and such coordinates fall back to the λ-weighted
    average. The floor also keeps the denominator ≥ floor > 0. The prior is not floored. Unlike
    the official default ``normalize_fishers=True``, Fishers are not rescaled by their norms;
    fold any such scaling into ``weights``.

    Parameters
    ----------
    params, fishers
        Per client, the list of parameter tensors and their diagonal Fishers (F ≥ 0), in the same
        order and shapes for every client.
    weights
        One non-negative weight per client (e.g. its number of examples), not all zero.
    floor
        Lower bound on each client's Fisher, > 0.
    prior
        (θ_old, F_old, γ): old global parameters, their Fisher (≥ 0), and γ ≥ 0.

    Returns
    -------
    list
        The merged tensors, float32, shaped like the inputs.

    Raises
    ------
    ValueError
        On mismatched counts or shapes (naming client and tensor), negative or non-finite
        Fishers, bad weights, floor ≤ 0 or γ < 0.
    """
    if len(params) == 0:
        raise ValueError("fisher_merge needs at least one client")
    if len(fishers) != len(params) or len(weights) != len(params):
        raise ValueError(
            f"got {len(params)} clients' params, {len(fishers)} fishers and {len(weights)} weights"
        )
    if not floor > 0:
        raise ValueError(f"floor must be positive, got {floor}")
    lam = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(lam)) or np.any(lam < 0) or lam.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}")
    lam = lam / lam.sum()

    shapes = [np.shape(p) for p in params[0]]
    numerator = [np.zeros(shape) for shape in shapes]
    denominator = [np.zeros(shape) for shape in shapes]
    for k, (theta_k, fisher_k) in enumerate(zip(params, fishers, strict=True)):
        theta_k = _check_tensor_list(f"client {k} params", theta_k, shapes)
        fisher_k = _check_tensor_list(f"client {k} fisher", fisher_k, shapes)
        for j, (theta, fisher) in enumerate(zip(theta_k, fisher_k, strict=True)):
            if np.any(fisher < 0):
                raise ValueError(f"client {k} fisher tensor {j} has negative entries")
            weighted = lam[k] * np.maximum(fisher, floor)
            numerator[j] += weighted * theta
            denominator[j] += weighted

    if prior is not None:
        theta_old, fisher_old, gamma = prior
        if not (np.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"prior weight gamma must be finite and non-negative, got {gamma}")
        theta_old = _check_tensor_list("prior params", theta_old, shapes)
        fisher_old = _check_tensor_list("prior fisher", fisher_old, shapes)
        for j, (theta, fisher) in enumerate(zip(theta_old, fisher_old, strict=True)):
            if np.any(fisher < 0):
                raise ValueError(f"prior fisher tensor {j} has negative entries")
            numerator[j] += gamma * fisher * theta
            denominator[j] += gamma * fisher

    return [(num / den).astype(np.float32) for num, den in zip(numerator, denominator, strict=True)]
