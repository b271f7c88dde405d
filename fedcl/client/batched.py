"""Batched forward passes: one network run for K clients' weights at once, with plain autograd.

`vmap` over `functional_call` (the general path in `fedcl.client.vectorized`) pays functorch's
per-operation dispatch on every layer; for the small networks simulated clients train that costs
more than the arithmetic. Where a model is a chain of layers this module knows, `batched_forward`
runs the same layers on stacked weights directly: a linear layer becomes one `baddbmm`, a
convolution one grouped convolution over the clients, elementwise activations and pooling run
unchanged on the stacked activations. After a convolution the activations stay merged, the
clients' channels side by side in one channels-last batch (`_Merged`), until a layer needs the
clients' rows again: CPU pooling (with indices, as autograd needs) and grouped convolution run
several times faster in that layout. Gradients come from ordinary autograd on the summed loss:
the clients' weights are separate tensors' rows that never meet, so each row's gradient is its
own client's.

The model is read with `torch.fx`: a model whose trace holds anything outside the known layers
(a function call, a method call, a layer type not listed) gets a reason instead of a forward,
and the caller keeps `vmap`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import fx, nn

Tensors = dict[str, torch.Tensor]
BatchedForward = Callable[[Tensors, Tensors, torch.Tensor], torch.Tensor]

# Layers without weights that act elementwise: the stacked (K, B, ...) activations go through as
# they are.
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Hardtanh,
    nn.Identity,
)
# Layers without weights that see one sample's (C, ...) at a time: run on (K·B, C, ...).
_PER_SAMPLE: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_POOL_1D: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
)
_CONV: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d)


class _Merged(NamedTuple):
    """K clients' activations as one batch whose channels are the clients' channels side by side:
    (B, K·C, H, W), channels-last in memory. A 1-D activation (B, K·C, L) is held as H = 1."""

    tensor: torch.Tensor
    clients: int
    one_d: bool


def _merge(x: torch.Tensor, one_d: bool) -> _Merged:
    """Stacked activations (K, B, C, *spatial) merged into one channels-last batch (one copy)."""
    clients, batch, channels, *spatial = x.shape
    height = [1] if one_d else []
    merged = torch.empty(
        (batch, clients * channels, *height, *spatial),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last,
    )
    rows = merged.squeeze(2) if one_d else merged
    rows.unflatten(1, (clients, channels)).copy_(x.transpose(0, 1))
    return _Merged(merged, clients, one_d)


class _Split(torch.autograd.Function):
    """Merged activations split into the clients' rows (K, B, C, *spatial), contiguous. Its
    gradient goes back merged and channels-last in one copy: the pooling and convolution before
    it would each copy a gradient in any other layout."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, merged: torch.Tensor, clients: int, one_d: bool
    ) -> torch.Tensor:
        ctx.one_d = one_d
        merged = merged.squeeze(2) if one_d else merged
        return merged.unflatten(1, (clients, -1)).transpose(0, 1).contiguous()

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None]:
        return _merge(grad, ctx.one_d).tensor, None, None


def _stacked(x: torch.Tensor | _Merged) -> torch.Tensor:
    """The activations as (K, B, C, *spatial), merged ones split back into the clients' rows."""
    if not isinstance(x, _Merged):
        return x
    return _Split.apply(x.tensor, x.clients, x.one_d)


def batched_forward(model: nn.Module) -> tuple[BatchedForward | None, str | None]:
    """(forward, None) if `model` is a chain of layers this module runs batched, else (None, why).

    `forward(stacked, shared, x)` runs `model` for K clients at once: `x` is (K, B, *input),
    `stacked` maps parameter names (as in `model.named_parameters()`) to (K, *shape) tensors,
    `shared` maps the other parameters and buffers to tensors used by every client alike. It
    returns (K, B, *output): row k equals `functional_call(model, weights_k, x[k])` up to
    float rounding.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # data-dependent control flow and the like: vmap handles it
        return None, f"torch.fx cannot trace the model ({type(error).__name__})"
    modules = dict(model.named_modules())
    steps: list[tuple[str, str, str, nn.Module]] = []  # (node, its input node, prefix, module)
    source, output = None, None
    for node in graph.nodes:
        if node.op == "placeholder":
            if source is not None:
                return None, "the model takes more than one input"
            source = node.name
        elif node.op == "call_module":
            module = modules[node.target]
            why = _unsupported(module)
            if why is not None:
                return None, f"{node.target}: {why}"
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                return None, f"{node.target} is called with other than one input"
            steps.append((node.name, node.args[0].name, str(node.target), module))
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                return None, "the model returns other than one tensor"
            output = node.args[0].name
        else:
            return None, f"{node.op} {node.target} in the forward"
    if source is None or output is None or not steps:
        return None, "the model has no layers to run"
    steps = _pool_before_relu(steps, {node.name: len(node.users) for node in graph.nodes})

    def forward(stacked: Tensors, shared: Tensors, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor | _Merged] = {source: x}
        for name, argument, prefix, module in steps:
            values[name] = _run(module, prefix, values[argument], stacked, shared)
        return _stacked(values[output])

    return forward, None


def _pool_before_relu(
    steps: list[tuple[str, str, str, nn.Module]], users: dict[str, int]
) -> list[tuple[str, str, str, nn.Module]]:
    """`steps` with each ReLU that only feeds a max pooling run after it instead: the same
    values and gradients (ReLU is monotone and keeps positive values, so the pooled maximum's
    index is the same, and a window with no positive value passes no gradient either way), for
    half the activations."""
    out = list(steps)
    for i in range(len(out) - 1):
        relu, pool = out[i], out[i + 1]
        if (
            type(relu[3]) is nn.ReLU
            and isinstance(pool[3], nn.MaxPool1d | nn.MaxPool2d)
            and pool[1] == relu[0]
            and users[relu[0]] == 1
        ):
            out[i] = (relu[0], relu[1], pool[2], pool[3])
            out[i + 1] = (pool[0], relu[0], relu[2], relu[3])
    return out


def _unsupported(module: nn.Module) -> str | None:
    """Why `module` cannot run batched here, or None."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, _CONV):
        if module.padding_mode != "zeros":
            return f"padding mode {module.padding_mode!r}"
        return None
    if isinstance(module, nn.Flatten):
        return None if module.start_dim >= 1 and module.end_dim == -1 else "flatten dims"
    if isinstance(module, _ELEMENTWISE) and not getattr(module, "inplace", False):
        return None
    if isinstance(module, _PER_SAMPLE):
        return None
    return f"{type(module).__name__} has no batched form here"


def _weight(name: str, stacked: Tensors, shared: Tensors) -> torch.Tensor | None:
    """Parameter `name`: stacked (K, *shape) if trained, else shared (*shape); None if absent."""
    return stacked[name] if name in stacked else shared.get(name)


def _run(
    module: nn.Module,
    prefix: str,
    x: torch.Tensor | _Merged,
    stacked: Tensors,
    shared: Tensors,
) -> torch.Tensor | _Merged:
    """`module` (registered as `prefix`) applied to the activations x: stacked (K, B, ...) or
    merged (after a convolution)."""
    if isinstance(module, _CONV):
        return _conv(module, prefix, x, stacked, shared)
    if isinstance(x, _Merged):
        if isinstance(module, _ELEMENTWISE):
            return x._replace(tensor=module(x.tensor))
        if isinstance(module, _PER_SAMPLE) and isinstance(module, _POOL_1D) == x.one_d:
            # Pooling sees each channel alone, so the merged batch pools as K·C channels.
            if x.one_d:
                return x._replace(tensor=module(x.tensor.squeeze(2)).unsqueeze(2))
            return x._replace(tensor=module(x.tensor))
        x = _stacked(x)
    clients, batch = x.shape[:2]
    if isinstance(module, nn.Linear):
        weight = _weight(f"{prefix}.weight", stacked, shared)
        bias = _weight(f"{prefix}.bias", stacked, shared)
        return _linear(x, weight, bias, clients)
    if isinstance(module, nn.Flatten):
        return x.flatten(module.start_dim + 1)
    if isinstance(module, _ELEMENTWISE):
        return module(x)
    out = module(x.reshape(clients * batch, *x.shape[2:]))
    return out.reshape(clients, batch, *out.shape[1:])


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, clients: int
) -> torch.Tensor:
    """x @ Wᵀ + b per client: x (K, B, ..., in), W (K, out, in) or shared (out, in)."""
    shape = x.shape
    flat = x.reshape(clients, -1, shape[-1])
    if weight.dim() == 2:
        out = flat.matmul(weight.t())
        if bias is not None:
            out = out + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
    else:
        # (W xᵀ)ᵀ rather than x Wᵀ: autograd then hands back W's gradient contiguous, in W's
        # layout, and the SGD step on the (K, out, in) weights runs on contiguous memory.
        rows = flat.transpose(1, 2)
        if bias is None:
            out = torch.bmm(weight, rows).transpose(1, 2)
        else:
            bias = (
                bias.unsqueeze(2) if bias.dim() == 2 else bias[None, :, None].expand(clients, -1, 1)
            )
            out = torch.baddbmm(bias, weight, rows).transpose(1, 2)
    return out.reshape(*shape[:-1], out.shape[-1])


def _conv(
    module: nn.Module,
    prefix: str,
    x: torch.Tensor | _Merged,
    stacked: Tensors,
    shared: Tensors,
) -> torch.Tensor | _Merged:
    """A Conv1d/Conv2d per client as one grouped convolution on the merged activations, client
    k's filters seeing only client k's channels; a 1-D convolution runs as a 2-D one of height 1
    (CPU backends keep channels-last only in 2-D)."""
    weight = _weight(f"{prefix}.weight", stacked, shared)
    bias = _weight(f"{prefix}.bias", stacked, shared)
    one_d = isinstance(module, nn.Conv1d)
    if weight.dim() == module.weight.dim() and (bias is None or bias.dim() == 1):
        # Shared filters (a frozen layer): one ordinary convolution over all clients' samples.
        x = _stacked(x)
        clients, batch = x.shape[:2]
        out = module._conv_forward(x.reshape(clients * batch, *x.shape[2:]), weight, bias)
        return out.reshape(clients, batch, *out.shape[1:])
    if not isinstance(x, _Merged) or x.one_d != one_d:
        x = _merge(_stacked(x), one_d)
    clients = x.clients
    if weight.dim() == module.weight.dim():
        weight = weight.expand(clients, *weight.shape)
    filters = weight.reshape(clients * weight.shape[1], *weight.shape[2:])
    if bias is not None:
        bias = (bias if bias.dim() == 2 else bias.expand(clients, -1)).reshape(-1)
    stride, padding, dilation = module.stride, module.padding, module.dilation
    if one_d:
        filters = filters.unsqueeze(2)
        stride, dilation = (1, *stride), (1, *dilation)
        padding = padding if isinstance(padding, str) else (0, *padding)
    out = F.conv2d(
        x.tensor.contiguous(memory_format=torch.channels_last),
        filters,
        bias,
        stride,
        padding,
        dilation,
        module.groups * clients,
    )
    return _Merged(out, clients, one_d)


def batched_loss_step(
    forward: BatchedForward,
    shared: Tensors,
    anchor: Tensors,
    proximal_mu: float,
) -> Callable[..., tuple[Tensors, torch.Tensor]]:
    """The per-step function `_train_stacked` calls, with `forward`: given the active clients'
    stacked weights, padded batches x (K, B, ...), targets y (K, B), the real-row flags
    (K, B), real-row counts (K,) and class masks (K, B, classes) or None, return each client's
    gradient (stacked) and loss, as `vmap(grad_and_value(loss))` would."""

    def step(
        params: Tensors,
        x: torch.Tensor,
        y: torch.Tensor,
        real: torch.Tensor,
        count: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[Tensors, torch.Tensor]:
        leaves = {name: value.detach().requires_grad_() for name, value in params.items()}
        with torch.enable_grad():
            logits = forward(leaves, shared, x)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            clients, batch = y.shape
            per_row = F.cross_entropy(
                logits.reshape(clients * batch, -1), y.reshape(-1), reduction="none"
            ).reshape(clients, batch)
            losses = torch.where(real, per_row, 0.0).sum(1) / count
            if proximal_mu > 0:
                drift = sum(
                    (leaves[name] - anchor[name]).pow(2).flatten(1).sum(1) for name in leaves
                )
                losses = losses + 0.5 * proximal_mu * drift
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True)), losses.detach()

    return step
