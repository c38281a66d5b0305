"""LeNet-5 (LeCun et al. 1998) as the multi-tangent paper's Section 4.5 trains it.

frog's LeNet-5: two blocks of ``conv5x5 (no padding) - BatchNorm - ReLU - maxpool2`` (6 and 16 channels),
then ``Linear(120) - ReLU - Linear(84) - ReLU - Linear(num_classes)``. On 28x28 MNIST the features are
16 x 4 x 4 = 256, on 32x32 images 16 x 5 x 5 = 400 (the original LeNet-5's). The batch norms are frog's
addition to the 1998 network; ``batch_norm=False`` gives the original layout.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from fwdgrad.nn.models.basic import image_shape

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """LeNet-5 on ``(C, H, W)`` images of at least 16x16 pixels (two valid 5x5 convolutions and two 2x2 pools).

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: outputs of the last layer.
        batch_norm: BatchNorm after each convolution (frog's variant, the default).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        c, h, w = image_shape("LeNet5", input_shape, min_size=16)

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            norm: list[nn.Module] = [nn.BatchNorm2d(c_out)] if batch_norm else []
            return [nn.Conv2d(c_in, c_out, kernel_size=5), *norm, nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(c, 6), *block(6, 16))
        side = lambda s: ((s - 4) // 2 - 4) // 2  # noqa: E731  (conv5 valid, pool2, twice)
        self.classifier = nn.Sequential(
            nn.Linear(16 * side(h) * side(w), 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))
