"""The small models: logistic regression, the MLP and the paper-style conv net, and helpers every model uses."""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor, nn

from fwdgrad.errors import ConfigError
from fwdgrad.nn.local_losses import LocalBlock, aux_head, build_blocks, check_groups

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

    ``local_losses``: every hidden layer is a block with its own loss (:mod:`fwdgrad.nn.local_losses`): the hidden
    layers but the last get an auxiliary linear classifier (``aux_heads``); the last one's head is the output
    layer. ``local_groups``: unit groups per block (Ren et al.). The layers and their names are the same either
    way, and ``forward`` is unchanged (evaluation uses the output layer).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden_sizes: Sequence[int] = (1024, 1024),
        activation: str = "relu",
        local_losses: bool = False,
        local_groups: int = 1,
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
        self.local_losses = bool(local_losses)
        if self.local_losses:
            self.local_groups = check_groups(local_groups, list(hidden_sizes))
            self.aux_heads = nn.ModuleList([aux_head(w, num_classes) for w in hidden_sizes[:-1]])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))

    def local_blocks(self) -> Tuple[LocalBlock, ...]:
        """The blocks (views on ``net``): ``[flatten, linear, act] -> aux head``, ..., ``[linear, act] -> output
        layer`` (one block holding only the output layer when there is no hidden layer)."""
        layers = list(self.net)
        bodies = [layers[i:i + 2] for i in range(0, len(layers) - 1, 2)] or [[]]
        bodies[0] = [nn.Flatten(), *bodies[0]]
        return build_blocks(bodies, [*self.aux_heads, layers[-1]], self.local_groups)


class ConvNet(nn.Module):
    """A small VGG-style conv net in the spirit of the paper's CNN.

    Two blocks of ``conv3x3(channels) - ReLU - conv3x3(channels) - ReLU - maxpool2``, then
    ``Linear(1024) - ReLU - Linear(num_classes)``. Padding keeps spatial size inside a block, so it works on
    28x28 (MNIST), 32x32 (CIFAR-10) and 8x8 (scikit-learn digits) images alike.

    ``local_losses``: every conv layer (with its ReLU, and the pooling after it) is a block with an auxiliary
    head (spatial mean, then linear), and ``Linear(hidden) - ReLU`` is the last block, whose head is the output
    layer (:mod:`fwdgrad.nn.local_losses`); ``local_groups`` splits every block's channels/units into groups.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: int = 32,
        hidden_size: int = 1024,
        local_losses: bool = False,
        local_groups: int = 1,
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
        self.local_losses = bool(local_losses)
        if self.local_losses:
            self.local_groups = check_groups(local_groups, [channels, hidden_size])
            self.aux_heads = nn.ModuleList([aux_head(channels, num_classes, spatial=True) for _ in range(4)])

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))

    def local_blocks(self) -> Tuple[LocalBlock, ...]:
        """The blocks (views): conv-ReLU, conv-ReLU-pool, conv-ReLU, conv-ReLU-pool (each with an auxiliary
        head), then flatten-linear-ReLU with the output layer as its head."""
        f, c = list(self.features), list(self.classifier)
        bodies = [f[0:2], f[2:5], f[5:7], f[7:10], [nn.Flatten(), *c[0:2]]]
        return build_blocks(bodies, [*self.aux_heads, c[2]], self.local_groups)


def output_shape(model: nn.Module, input_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Shape of ``model``'s output for one example (used in start-up checks)."""
    with torch.no_grad():
        return tuple(model(torch.zeros(1, *input_shape)).shape[1:])
