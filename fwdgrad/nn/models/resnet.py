"""ResNet-18, CIFAR variant (He et al. 2016), the convolutional network of the multi-tangent paper's Section 4.5.

The ImageNet ResNet starts with a 7x7 stride-2 convolution and a max-pool, which would leave a 32x32 image
8x8 before the first block. The CIFAR variant keeps the resolution: a 3x3 stride-1 stem, no max-pool, then
four stages of two basic blocks (64, 128, 256, 512 channels; the last three halve the resolution), global
average pooling and a linear head: 11.17 M parameters for 10 classes. BatchNorm follows every convolution.

In training mode batch norm normalises with the batch's statistics and moves its running statistics once per
step (:class:`~fwdgrad.estimators.step_buffers.StepBuffers`); the forward-mode rule differentiates through the batch
statistics (:mod:`fwdgrad.engine.rules.normalization`).
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fwdgrad.errors import ConfigError
from fwdgrad.nn.models.basic import image_shape

__all__ = ["BasicBlock", "ResNet"]


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """``relu(BN(conv3x3(relu(BN(conv3x3(x))))) + shortcut(x))``; the shortcut is the identity, or a strided
    1x1 convolution with BatchNorm where the block changes the resolution or the channel count."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2 = _conv_bn(c_out, c_out, 3, 1)
        self.shortcut = _conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet with basic blocks; the defaults are ResNet-18.

    Args:
        input_shape: ``(C, H, W)``, any size (global average pooling before the head).
        num_classes: outputs of the head.
        width: channels of the first stage (64); stage i has ``width * 2**i``.
        blocks: basic blocks per stage, ``[2, 2, 2, 2]`` for ResNet-18 (fewer or smaller for quick checks).
    """

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, width: int = 64, blocks: Sequence[int] = (2, 2, 2, 2)
    ) -> None:
        super().__init__()
        c, _, _ = image_shape("ResNet", input_shape)
        if width < 1 or not blocks or any(b < 1 for b in blocks):
            raise ConfigError(f"ResNet needs width >= 1 and at least one block per stage, got width={width}, "
                              f"blocks={list(blocks)}.")
        self.stem = _conv_bn(c, width, 3, 1)
        stages, c_in = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2**i
            stages += [BasicBlock(c_in if j == 0 else c_out, c_out, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.stages(F.relu(self.stem(x)))).flatten(1))
