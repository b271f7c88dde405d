"""Batched forward passes equal each client's own forward; models it cannot run get a reason."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fedcl.client.batched import batched_forward, batched_loss_step
from fedcl.models import build_model

CLIENTS, BATCH = 3, 5


def stacked_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every trainable parameter stacked for CLIENTS clients, each row different."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: param.detach() + 0.1 * torch.randn(CLIENTS, *param.shape, generator=generator)
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def shared_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen parameters and buffers, used by every client alike."""
    shared = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    shared.update({n: b.detach() for n, b in model.named_buffers()})
    return shared


def per_client_forward(model, stacked, shared, x) -> torch.Tensor:
    """Client k's logits: its own row of every stacked weight, through the model itself."""
    return torch.stack(
        [
            functional_call(model, ({n: w[k] for n, w in stacked.items()}, shared), (x[k],))
            for k in range(CLIENTS)
        ]
    )


MODELS = {
    "mlp": lambda: build_model("mlp", (7,), 4, hidden=(6, 5), seed=1),
    "cnn1d": lambda: build_model("cnn", (2, 11), 4, channels=(3, 4), seed=2),
    "cnn2d": lambda: build_model("cnn", (2, 6, 5), 4, channels=(3,), seed=3),
    "activations": lambda: nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 8),
        nn.Tanh(),
        nn.Linear(8, 8, bias=False),
        nn.GELU(),
        nn.Linear(8, 4),
    ),
    # Convolutions with stride, dilation, "same" padding and groups, average and adaptive
    # pooling, a convolution right after another: the merged (channels-last) path throughout.
    "convs1d": lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1),
        nn.ReLU(),  # before an average pooling: must not move after it
        nn.AvgPool1d(2, ceil_mode=True),
        nn.Conv1d(4, 4, 3, padding="same", dilation=2, groups=2),
        nn.AdaptiveMaxPool1d(3),
        nn.Flatten(),
        nn.Linear(12, 4),
    ),
    "convs2d": lambda: nn.Sequential(
        nn.Conv2d(2, 4, (3, 2), stride=(1, 2), padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(4, 3, 1),
        nn.AdaptiveAvgPool2d((2, 1)),
        nn.Flatten(),
        nn.Linear(6, 4),
    ),
    # Ends in a convolution: the merged activations must come back as (K, B, C, L).
    "ends_in_conv": lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.ELU(), nn.Conv1d(3, 4, 2)),
}
SHAPES = {
    "mlp": (7,),
    "cnn1d": (2, 11),
    "cnn2d": (2, 6, 5),
    "activations": (3, 4),
    "convs1d": (2, 11),
    "convs2d": (2, 6, 5),
    "ends_in_conv": (2, 11),
}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("frozen", [False, True])
def test_batched_forward_equals_each_clients_forward(kind, frozen):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    if frozen:  # the first weighted layer shared by all clients (frozen), the rest stacked
        first = next(m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d))
        for param in first.parameters():
            param.requires_grad_(False)
    forward, why = batched_forward(model)
    assert why is None and forward is not None
    stacked, shared = stacked_weights(model, 1), shared_tensors(model)
    x = torch.randn(CLIENTS, BATCH, *SHAPES[kind], dtype=torch.float64)
    got = forward({n: w.double() for n, w in stacked.items()}, shared, x)
    expected = per_client_forward(model, {n: w.double() for n, w in stacked.items()}, shared, x)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["mlp", "cnn1d", "convs1d", "convs2d"])
def test_batched_step_gives_each_client_its_own_gradient_and_loss(kind):
    model = MODELS[kind]().double()
    forward, _ = batched_forward(model)
    stacked = {n: w.double() for n, w in stacked_weights(model, 2).items()}
    anchor = {n: p.detach() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(CLIENTS, BATCH, *SHAPES[kind], dtype=torch.float64, generator=generator)
    y = torch.randint(4, (CLIENTS, BATCH), generator=generator)
    real = torch.ones(CLIENTS, BATCH, dtype=torch.bool)
    real[1, 3:] = False  # client 1's batch is short: padding must not count
    count = real.sum(1).double()
    mu = 0.2
    grads, losses = batched_loss_step(forward, {}, anchor, mu)(stacked, x, y, real, count, None)
    for k in range(CLIENTS):
        own = {n: w[k].clone().requires_grad_() for n, w in stacked.items()}
        rows = real[k]
        logits = functional_call(model, own, (x[k][rows],))
        loss = torch.nn.functional.cross_entropy(logits, y[k][rows])
        loss = loss + 0.5 * mu * sum((own[n] - anchor[n]).pow(2).sum() for n in own)
        expected = torch.autograd.grad(loss, list(own.values()))
        torch.testing.assert_close(losses[k], loss.detach(), atol=1e-12, rtol=0)
        for name, grad in zip(own, expected, strict=True):
            torch.testing.assert_close(grads[name][k], grad, atol=1e-12, rtol=0)


class Doubling(nn.Module):
    """A forward with a tensor operation between layers: not a plain chain of layers."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) * 2


@pytest.mark.parametrize(
    ("model", "named"),
    [
        (Doubling(), "call_function"),
        (nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), "LayerNorm"),
        (nn.Sequential(nn.Linear(3, 3), nn.ReLU(inplace=True)), "ReLU"),
        (nn.Sequential(nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular")), "padding"),
    ],
)
def test_models_it_cannot_run_get_a_reason(model, named):
    forward, why = batched_forward(model)
    assert forward is None and named in why
