"""A small Vision Transformer (Dosovitskiy et al. 2021), the ViT of the multi-tangent paper's Section 4.5.

frog (Helmholtz-AI-Energy/frog) trains torchvision's ViT at a small size: 6 layers, 4 heads, hidden size 256,
MLP size 512, patches of 4x4 on 28x28 / 32x32 images, LayerNorm eps 1e-6, no dropout, a class token and
learned position embeddings, torchvision's initialisation (the head starts at zero). This is that network,
with attention written out (:class:`~fwdgrad.nn.models.layers.SelfAttention`) so that forward-mode AD has a rule
for every op.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
from torch import Tensor, nn

from fwdgrad.nn.models.basic import image_shape
from fwdgrad.nn.models.layers import FeedForward, PatchEmbedding, SelfAttention

__all__ = ["EncoderBlock", "VisionTransformer"]


class EncoderBlock(nn.Module):
    """Pre-norm transformer layer: ``x + Attention(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=eps)
        self.attention = SelfAttention(dim, num_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout(self.attention(self.ln_1(x)))
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding, class token, position embedding, ``num_layers`` encoder blocks, a final
    LayerNorm and a linear head on the class token.

    Args:
        input_shape: ``(C, H, W)``; ``patch_size`` must divide H and W.
        num_classes: outputs of the head.
        patch_size: side of the square patches (4 for 28x28 and 32x32 images: 49 or 64 tokens).
        num_layers, num_heads, hidden_dim, mlp_dim: the encoder's size (``hidden_dim`` a multiple of
            ``num_heads``).
        dropout: after the embedding, on the attention weights and outputs, in the MLPs (0 in the paper).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        patch_size: int = 4,
        num_layers: int = 6,
        num_heads: int = 4,
        hidden_dim: int = 256,
        mlp_dim: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        image = image_shape("VisionTransformer", input_shape)
        self.patch_embedding = PatchEmbedding("VisionTransformer", image, patch_size, hidden_dim)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, self.patch_embedding.num_patches + 1, hidden_dim))
        self.dropout = nn.Dropout(dropout)
        block = partial(EncoderBlock, hidden_dim, num_heads, mlp_dim, dropout, 1e-6)
        self.layers = nn.Sequential(*[block() for _ in range(num_layers)])
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.head = nn.Linear(hidden_dim, num_classes)
        self._init_like_torchvision()

    def _init_like_torchvision(self) -> None:
        """torchvision's ViT initialisation (which frog keeps): truncated-normal patch projection (std
        sqrt(1/fan_in)), position embedding N(0, 0.02^2), Xavier-uniform attention and MLP weights with zero
        attention biases and N(0, 1e-12) MLP biases, and a zero head."""
        proj = self.patch_embedding.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.pos_embedding, std=0.02)
        for block in self.layers:
            nn.init.xavier_uniform_(block.attention.in_proj.weight)
            nn.init.zeros_(block.attention.in_proj.bias)
            nn.init.zeros_(block.attention.out_proj.bias)
            for m in block.mlp.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.normal_(m.bias, std=1e-6)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embedding(x)  # (N, S, D)
        cls = self.class_token.expand(tokens.shape[0], -1, -1)
        tokens = self.dropout(torch.cat([cls, tokens], dim=1) + self.pos_embedding)
        return self.head(self.norm(self.layers(tokens))[:, 0])
