"""MLP-Mixer (Tolstikhin et al. 2021), the all-MLP model of the multi-tangent paper's Section 4.5.

frog's configuration: patches of 4x4, hidden size 512, token-mixing MLP 256, channel-mixing MLP 2048, 8 Mixer
layers, GELU, no dropout, PyTorch's default initialisation; the head is LayerNorm, the mean over tokens and a
linear layer.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

from torch import Tensor, nn

from fwdgrad.nn.models.basic import image_shape
from fwdgrad.nn.models.layers import FeedForward, PatchEmbedding

__all__ = ["MixerLayer", "MLPMixer"]


class MixerLayer(nn.Module):
    """``x + TokenMLP(LN(x)^T)^T`` (mixes the S tokens of each feature), then ``x + ChannelMLP(LN(x))`` (mixes
    the D features of each token); ``x`` is ``(N, S, D)``."""

    def __init__(self, dim: int, num_patches: int, token_mlp_dim: int, channel_mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixing = FeedForward(num_patches, token_mlp_dim, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mixing = FeedForward(dim, channel_mlp_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.token_mixing(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mixing(self.norm2(x))


class MLPMixer(nn.Module):
    """MLP-Mixer classifier: per-patch linear embedding, ``num_blocks`` Mixer layers, LayerNorm, mean over the
    tokens, linear head.

    Args:
        input_shape: ``(C, H, W)``; ``patch_size`` must divide H and W.
        num_classes: outputs of the head.
        patch_size: side of the square patches (4 for 28x28 and 32x32 images: 49 or 64 tokens).
        hidden_dim: features per token; token_mlp_dim / channel_mlp_dim: hidden sizes of the two MLPs.
        num_blocks: Mixer layers. dropout: inside the MLPs (0 in the paper).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch_size: int = 4,
        hidden_dim: int = 512,
        token_mlp_dim: int = 256,
        channel_mlp_dim: int = 2048,
        num_blocks: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        image = image_shape("MLPMixer", input_shape)
        self.patch_embedding = PatchEmbedding("MLPMixer", image, patch_size, hidden_dim)
        layer = partial(MixerLayer, hidden_dim, self.patch_embedding.num_patches, token_mlp_dim, channel_mlp_dim,
                        dropout)
        self.layers = nn.Sequential(*[layer() for _ in range(num_blocks)])
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.layers(self.patch_embedding(x))).mean(dim=1))
