"""Federated Orthogonal Training (FOT) math: projection and Global Principal Subspace Extraction.

Bakman, Yaldiz, Ezzeldin, Avestimehr, "Federated Orthogonal Training: Mitigating Global
Catastrophic Forgetting in Continual Federated Learning" (ICLR 2024). These are plain torch
functions; the strategy decides when to call them.

For one protected layer with weight W (linear (out, in); conv (out, in, k) or (out, in, kh, kw),
read as (out, d) with d = in·k or in·kh·kw), U (d × k) is an orthonormal basis of the input
subspace used by old tasks.

* Server, every round after the first task (``project_update``): the aggregated update G is
  replaced by G (I − U Uᵀ), so the layer's response to old-task inputs does not change.
* Client, at the end of a task (``layer_inputs`` → ``activation_sketch``): the representation
  matrix A (d × n), its residual R = A − U Uᵀ A, the ratio ‖R‖_F / ‖A‖_F, and the sketch R Q
  with a private random Q (n × m).
* Server, at the end of a task (``mean_residual_ratio`` → ``expand_basis``): Y = Σ_k R_k Q_k,
  whose E[Y Yᵀ] ∝ Σ_k R_k R_kᵀ, gives the new directions; the threshold is corrected by the
  energy the old basis already covers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PROJECTION_KINDS = ("uniform", "gaussian")

_SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _is_empty(basis: torch.Tensor | None) -> bool:
    return basis is None or basis.numel() == 0


def project_update(update: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Remove from a weight update its component acting on the old-task input subspace.

    With G the update flattened to (out, d) and U (d × k) with orthonormal columns, returns

        P(G) = G − (G U) Uᵀ = G (I − U Uᵀ),

    reshaped back to ``update.shape``. Then P(G) U = 0: for any old-task input a = U c, the
    change of the layer's pre-activation, P(G) a, is zero. P is idempotent and leaves updates
    already in the complement (G U = 0) unchanged.

    Parameters
    ----------
    update
        Update of one weight tensor: linear (out, in), conv1d (out, in, k) or conv2d
        (out, in, kh, kw). Flattening follows ``update.reshape(out, -1)``, the same row order as
        ``layer_inputs`` uses for conv patches.
    basis
        (d, k) with orthonormal columns, or None / zero columns: then ``update`` is returned
        unchanged (the same tensor).

    Raises
    ------
    ValueError
        If ``update`` has fewer than 2 dimensions or its flattened width is not ``basis.shape[0]``.
    """
    if _is_empty(basis):
        return update
    if update.dim() < 2:
        raise ValueError(
            f"project_update needs a weight with an output and an input dimension, got shape "
            f"{tuple(update.shape)}"
        )
    g = update.reshape(update.shape[0], -1)
    if basis.dim() != 2 or basis.shape[0] != g.shape[1]:
        raise ValueError(
            f"basis shape {tuple(basis.shape)} does not fit update {tuple(update.shape)} "
            f"flattened to {tuple(g.shape)}: basis needs {g.shape[1]} rows"
        )
    u = basis.to(dtype=g.dtype, device=g.device)
    # (G U) Uᵀ costs out·d·k; the official U Uᵀ Gᵀ forms a d × d matrix first. Same result.
    return (g - (g @ u) @ u.T).reshape(update.shape)


def _conv_patches(module: nn.Conv1d | nn.Conv2d, inputs: torch.Tensor) -> torch.Tensor:
    """im2col of ``inputs`` for ``module``: (in·∏kernel, batch·positions)."""
    if module.groups != 1:
        raise ValueError(
            f"layer_inputs supports convolutions with groups=1 only, got groups={module.groups}"
        )
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        # Pad exactly as the layer's own forward does ('same', reflect, circular, ...).
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(module.kernel_size)
    else:
        padding = module.padding
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):
        # A length-L signal is a 1 × L image; the (1, k) unfold then gives conv1d's patches.
        inputs = inputs.unsqueeze(-2)
        kernel, stride = (1, *kernel), (1, *stride)
        dilation, padding = (1, *dilation), (0, *padding)
    patches = F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)
    # (batch, d, positions) → (d, batch·positions); columns run batch-major, as the official code.
    return patches.permute(1, 0, 2).reshape(patches.shape[1], -1)


def _representation(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return inputs.reshape(-1, inputs.shape[-1]).T
    return _conv_patches(module, inputs)


def layer_inputs(
    model: nn.Module, x: torch.Tensor, layer_names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Representation matrix A (d × n) of each named layer's inputs for the batch ``x``.

    The columns of A are the vectors the layer's weight multiplies, so that for the weight
    W flattened to (out, d) the layer computes W A (plus bias):

    * ``nn.Linear``: the inputs transposed, (in, n) with n = batch (times any extra leading dims).
    * ``nn.Conv2d`` / ``nn.Conv1d``: im2col patches, (in·kh·kw, batch·positions), from
      ``F.unfold`` with the layer's own kernel size, stride, dilation and padding (padding modes
      other than zeros and string paddings are applied as the layer's forward does). Columns are
      batch-major, then positions in row-major order; rows follow ``weight.reshape(out, -1)``.

    The official code unfolds with padding 0 for AlexNet (the layers have no padding) and pads
    by hand before unfolding for ResNet; using the layer's own padding gives those same matrices
    and stays right for any other layer.

    The forward runs once under ``torch.no_grad()`` in eval mode (the model's mode is restored),
    so dropout does not perturb the inputs. A layer called more than once in the forward
    contributes the columns of every call, in call order.

    Parameters
    ----------
    model
        Any module; ``model(x)`` must run.
    x
        A batch of inputs for ``model``.
    layer_names
        Module names as in ``model.named_modules()`` (e.g. ``"layers.0"``, not
        ``"layers.0.weight"``) of ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` layers.

    Returns
    -------
    dict
        Layer name → A, detached, on the device and in the dtype of the layer's inputs.

    Raises
    ------
    ValueError
        If a name is not a module of ``model``, is not a supported layer type, is a grouped
        convolution, or is never called by the forward.
    """
    modules = dict(model.named_modules())
    for name in layer_names:
        if name not in modules:
            raise ValueError(f"layer_inputs: model has no module named {name!r}")
        if not isinstance(modules[name], _SUPPORTED_LAYERS):
            raise ValueError(
                f"layer_inputs: module {name!r} is {type(modules[name]).__name__}; supported are "
                "Linear, Conv1d and Conv2d"
            )
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            captured[name].append(_representation(module, args[0].detach()))

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in layer_names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    result = {}
    for name in layer_names:
        if not captured[name]:
            raise ValueError(f"layer_inputs: module {name!r} was not called by the forward")
        result[name] = torch.cat(captured[name], dim=1)
    return result


def random_projection(
    n: int, m: int, generator: torch.Generator, kind: str = "uniform"
) -> torch.Tensor:
    """A client's private random matrix Q (n × m) for the activation sketch R Q.

    Entries are i.i.d. with zero mean, so E[Q Qᵀ] = m σ² I and E[(R Q)(R Q)ᵀ] = m σ² R Rᵀ:

    * ``"uniform"``: U(−1, 1) (σ² = 1/3), as the official MLP trainer.
    * ``"gaussian"``: N(0, 1) (σ² = 1), as the official AlexNet and ResNet trainers.

    The official code uses m = d for the MLP and AlexNet convs and m = 5·d for AlexNet's fully
    connected layers and ResNet; the caller picks m. Drawn on ``generator``'s device, in the
    default dtype.
    """
    if n < 1 or m < 1:
        raise ValueError(f"random_projection needs n >= 1 and m >= 1, got n={n}, m={m}")
    device = generator.device
    if kind == "uniform":
        return torch.rand(n, m, generator=generator, device=device) * 2 - 1
    if kind == "gaussian":
        return torch.randn(n, m, generator=generator, device=device)
    raise ValueError(f"random_projection kind must be one of {PROJECTION_KINDS}, got {kind!r}")


def activation_sketch(
    activations: torch.Tensor, basis: torch.Tensor | None, projection: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Client side of GPSE for one layer: the sketch R Q and the residual ratio.

        R     = A − U Uᵀ A          (R = A when there is no basis yet)
        ratio = ‖R‖_F / ‖A‖_F       (1 when there is no basis)

    The ratio is the norm ratio, not squared, as in the official ``collect_activations``; it
    feeds ``mean_residual_ratio`` and the threshold correction in ``expand_basis``. If
    ‖A‖_F = 0 while a basis exists (the official code would produce NaN), the ratio is 0:
    the client has no energy left to cover.

    Parameters
    ----------
    activations
        A (d × n) from ``layer_inputs``.
    basis
        U (d × k) with orthonormal columns, or None / zero columns.
    projection
        Q (n × m), e.g. from ``random_projection``.

    Returns
    -------
    tuple
        (R Q of shape (d, m) in the dtype of ``activations``, ratio as a float).
    """
    if activations.dim() != 2 or projection.dim() != 2:
        raise ValueError("activation_sketch needs 2-D activations (d, n) and projection (n, m)")
    if projection.shape[0] != activations.shape[1]:
        raise ValueError(
            f"projection has {projection.shape[0]} rows but activations have "
            f"{activations.shape[1]} columns"
        )
    a = activations
    if _is_empty(basis):
        residual, ratio = a, 1.0
    else:
        if basis.dim() != 2 or basis.shape[0] != a.shape[0]:
            raise ValueError(
                f"basis shape {tuple(basis.shape)} does not fit activations with {a.shape[0]} rows"
            )
        u = basis.to(dtype=a.dtype, device=a.device)
        residual = a - u @ (u.T @ a)
        a_norm = torch.linalg.norm(a).item()
        ratio = torch.linalg.norm(residual).item() / a_norm if a_norm > 0 else 0.0
    q = projection.to(dtype=a.dtype, device=a.device)
    return residual @ q, ratio


def mean_residual_ratio(ratios: Sequence[float], counts: Sequence[int]) -> float:
    """Sample-weighted mean of the clients' residual ratios: r̄ = Σ_k n_k r_k / Σ_k n_k.

    ``counts`` are the clients' numbers of examples n_k (the official code weights by the
    client's dataset size, not by the number of activation columns).
    """
    if len(ratios) != len(counts):
        raise ValueError(f"{len(ratios)} ratios but {len(counts)} counts")
    if len(ratios) == 0:
        raise ValueError("mean_residual_ratio needs at least one client")
    if any(n < 0 for n in counts):
        raise ValueError(f"counts must be non-negative, got {list(counts)}")
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("counts sum to zero")
    return float(sum(float(n) * float(r) for r, n in zip(ratios, counts, strict=True)) / total)


def _orthonormalize(columns: torch.Tensor) -> torch.Tensor:
    """QR with R's diagonal made positive: already-orthonormal columns come back unchanged."""
    q, r = torch.linalg.qr(columns)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


def expand_basis(
    basis: torch.Tensor | None,
    summed_sketch: torch.Tensor,
    mean_ratio: float,
    threshold: float,
) -> torch.Tensor:
    """Server side of GPSE for one layer, following the official ``expand_orth_set``.

    With Y = Σ_k R_k Q_k (d × m), r̄ = ``mean_ratio``, ε = ``threshold``:

        ε'        = (r̄ − (1 − ε)) / r̄
        Y         = U_Y S V_Yᵀ                              (SVD)
        i         = smallest i with ‖S[:i+1]‖² / ‖Y‖_F² > ε'
        U         ← orthonormalise([U, U_Y[:, :i+1]])

    ε' is the share of the *new* energy still needed to cover a fraction ε of the whole, taking
    the old basis to cover 1 − r̄ of it already. (Exact energy bookkeeping would use r̄², since
    r̄ is a ratio of norms; the official code uses r̄ and so do we.)

    Edges (the official loop always takes at least one vector and, when no prefix passes
    ε', every column of U_Y):

    * ε' ≤ 0 (the old basis covers ε already), r̄ ≤ 0 or Y = 0: no new vector. The official
      code would add the top vector, or with Y = 0 (NaN ratios) every column of an arbitrary
      U_Y.
    * The count is capped at the numerical rank of Y (singular values above
      S_max · max(d, m) · machine ε of its dtype, as ``torch.linalg.matrix_rank``): directions
      with zero singular value carry no activation energy, and protecting them would only
      shrink the free space. So ε' ≥ 1 takes every direction Y has (d of them when Y has full
      row rank).
    * The new vectors are projected off the old basis before orthonormalising, and directions
      left with norm below √(machine ε) of the sketch's dtype are dropped; the official
      ``torch.qr`` of [U, U_Y] would turn such near-dependent columns into arbitrary ones. When
      the clients sketched residuals of this same basis, this changes nothing. The result never
      has more than d columns.

    Parameters
    ----------
    basis
        Current U (d × k), orthonormal columns, or None / zero columns for the first task.
    summed_sketch
        Y (d × m), the sum of the clients' ``activation_sketch`` outputs.
    mean_ratio
        r̄ from ``mean_residual_ratio`` (1 for the first task).
    threshold
        ε in [0, 1], the share of activation energy to protect.

    Returns
    -------
    torch.Tensor
        The new basis (d × k') with orthonormal columns, k' ≥ k, whose first k columns span the
        old basis (and equal it when it was orthonormal to float precision); (d, 0) when there is
        none. In the dtype and on the device of ``summed_sketch``.
    """
    if summed_sketch.dim() != 2:
        raise ValueError(f"summed_sketch must be 2-D (d, m), got {tuple(summed_sketch.shape)}")
    d = summed_sketch.shape[0]
    out = dict(dtype=summed_sketch.dtype, device=summed_sketch.device)
    if _is_empty(basis):
        old = torch.zeros(d, 0, dtype=torch.float64, device=summed_sketch.device)
    else:
        if basis.dim() != 2 or basis.shape[0] != d:
            raise ValueError(
                f"basis shape {tuple(basis.shape)} does not fit a sketch with {d} rows"
            )
        old = basis.to(dtype=torch.float64, device=summed_sketch.device)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")

    y = summed_sketch.to(torch.float64)
    total = torch.linalg.norm(y).item() ** 2
    if mean_ratio <= 0 or total == 0:
        return old.to(**out)
    adjusted = (mean_ratio - (1.0 - threshold)) / mean_ratio
    if adjusted <= 0:
        return old.to(**out)

    u_y, s, _ = torch.linalg.svd(y, full_matrices=False)
    rank = int((s > s[0] * max(y.shape) * torch.finfo(summed_sketch.dtype).eps).sum())
    energy = torch.cumsum(s**2, dim=0) / total
    passing = torch.nonzero(energy > adjusted)
    count = int(passing[0]) + 1 if len(passing) else len(s)
    new = u_y[:, : min(count, rank)]

    if old.shape[1]:
        new = new - old @ (old.T @ new)
    new_dirs, new_norms, _ = torch.linalg.svd(new, full_matrices=False)
    tol = torch.finfo(summed_sketch.dtype).eps ** 0.5
    new = new_dirs[:, new_norms > tol][:, : d - old.shape[1]]
    if new.shape[1] == 0:
        return old.to(**out)
    return _orthonormalize(torch.cat([old, new], dim=1)).to(**out)
