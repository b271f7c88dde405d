"""Small models for CPU-scale continual learning: an MLP and a CNN for 1-D or 2-D input."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import prod
from typing import Any

import torch
from torch import nn

from fedcl.errors import ConfigError
from fedcl.seeding import derive_seed

MODELS = ("mlp", "cnn")


class MLP(nn.Module):
    """Flatten, then Linear-ReLU blocks of the given widths, then a linear classifier head."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int]) -> None:
        super().__init__()
        widths = [prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate representation (the input of the head)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class CNN(nn.Module):
    """Conv-ReLU-MaxPool blocks (1-D for (C, L) input, 2-D for (C, H, W)), then a linear head."""

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int]
    ) -> None:
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise ConfigError(
                f"model cnn needs (C, L) or (C, H, W) input, the dataset gives {tuple(input_shape)}"
            )
        conv, pool = (
            (nn.Conv1d, nn.MaxPool1d) if len(input_shape) == 2 else (nn.Conv2d, nn.MaxPool2d)
        )
        layers: list[nn.Module] = []
        in_channels = input_shape[0]
        for out_channels in channels:
            layers += [
                conv(in_channels, out_channels, 3, padding=1),
                nn.ReLU(),
                pool(2, ceil_mode=True),
            ]
            in_channels = out_channels
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            width = self.features(torch.zeros(1, *input_shape)).shape[1]
        self.head = nn.Linear(width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Return the penultimate representation (the input of the head)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    hidden: Sequence[int] = (128, 128),
    channels: Sequence[int] = (16, 32),
    seed: int = 0,
) -> nn.Module:
    """Build model `name`, initialised from `seed` alone (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            return MLP(input_shape, num_classes, hidden)
        if name == "cnn":
            return CNN(input_shape, num_classes, channels)
    raise ConfigError(f"unknown model.name '{name}'; valid: {', '.join(MODELS)}")


def model_from_config(
    config: Mapping[str, Any], input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """The run's model as `config` (the resolved config as plain containers) describes it, with
    the run's initial weights: driver and clients build the very same network."""
    model = config["model"]
    return build_model(
        model["name"],
        input_shape,
        num_classes,
        hidden=model["hidden"],
        channels=model["channels"],
        seed=derive_seed(int(config["seed"]), "init"),
    )
