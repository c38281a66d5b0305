"""The small models: logistic regression, the MLP and the paper-style conv net, and helpers every model uses."""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from fwdgrad.errors import ConfigError

__all__ = ["MLP", "ConvNet", "LogisticRegression", "ACTIVATIONS", "image_shape", "output_shape"]

#: Activations selectable from the config by name (``model.activation=tanh``).
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}


def _features(input_shape: Sequence[int]) -> int:
    return int(math.prod(input_shape))


def image_shape(model: str, input_shape: Sequence[int], min_size: int = 1) -> Tuple[int, int, int]:
    """``(C, H, W)`` of an image dataset; a :class:`ConfigError` for tabular data or images smaller than
    ``min_size`` pixels a side (the message names the model and what to use instead)."""
    if len(input_shape) != 3:
        raise ConfigError(
            f"{model} needs image data of shape (channels, height, width), but this dataset has "
            f"input shape {tuple(input_shape)}; use model=mlp or model=logreg for tabular data."
        )
    c, h, w = (int(s) for s in input_shape)
    if h < min_size or w < min_size:
        raise ConfigError(
            f"{model} needs images of at least {min_size}x{min_size} pixels, got {h}x{w}; use a dataset of "
            "larger images (e.g. dataset=mnist) or another model (model=conv or model=mlp)."
        )
    return c, h, w


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer on the flattened input."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(_features(input_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Fully connected network on the flattened input: ``hidden_sizes`` layers with ``activation``.

    The paper's MNIST MLP is ``hidden_sizes=(1024, 1024)`` with ReLU (784-1024-1024-10).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int] = (1024, 1024),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {activation!r}; allowed: {', '.join(ACTIVATIONS)}."
            )
        sizes = [_features(input_shape), *hidden_sizes]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(sizes[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class ConvNet(nn.Module):
    """A small VGG-style conv net in the spirit of the paper's CNN.

    Two blocks of ``conv3x3(channels) - ReLU - conv3x3(channels) - ReLU - maxpool2``, then
    ``Linear(1024) - ReLU - Linear(num_classes)``. Padding keeps spatial size inside a block, so it works on
    28x28 (MNIST), 32x32 (CIFAR-10) and 8x8 (scikit-learn digits) images alike.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: int = 32,
        hidden_size: int = 1024,
    ) -> None:
        super().__init__()
        c, h, w = image_shape("ConvNet", input_shape, min_size=4)
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = channels * (h // 4) * (w // 4)
        self.classifier = nn.Sequential(nn.Linear(flat, hidden_size), nn.ReLU(), nn.Linear(hidden_size, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def output_shape(model: nn.Module, input_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Shape of ``model``'s output for one example (used in start-up checks)."""
    with torch.no_grad():
        return tuple(model(torch.zeros(1, *input_shape)).shape[1:])
