"""Building blocks of the token models (ViT, MLP-Mixer): patch embedding, a feed-forward block, self-attention.

Every op here has a rule in the fast forward-mode engine (:mod:`fwdgrad.engine.rules`) *and* a forward-mode
derivative in ``torch.func``, so both backends compute the same directional derivatives. That is why the
attention is written out instead of calling ``F.scaled_dot_product_attention`` (or ``nn.MultiheadAttention``,
which calls it): torch has no forward-mode rule for its fused kernels (``jvp`` raises NotImplementedError),
so the ``torch.func`` reference could not run on them.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor, nn

from fwdgrad.errors import ConfigError

__all__ = ["FeedForward", "PatchEmbedding", "SelfAttention", "patch_count"]


def patch_count(model: str, image: Tuple[int, int, int], patch_size: int, hint: str = "") -> int:
    """The number of ``patch_size`` x ``patch_size`` patches of a ``(C, H, W)`` image; a :class:`ConfigError`
    naming ``model`` when the size does not divide the image (``hint`` ends the message with more choices)."""
    _, h, w = image
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ConfigError(
            f"{model}: patch_size={patch_size} must divide the image size {h}x{w}; for 28x28 or 32x32 "
            f"images use 4 (or 2, 7/8, 14/16...){hint}."
        )
    return (h // patch_size) * (w // patch_size)


class PatchEmbedding(nn.Module):
    """Cut an image into ``patch_size`` x ``patch_size`` patches and map each linearly to ``dim`` features.

    One convolution with kernel = stride = ``patch_size`` is that per-patch linear map (ViT's ``conv_proj``,
    the MLP-Mixer's per-patch fully connected layer). ``(N, C, H, W) -> (N, S, dim)`` with
    ``S = (H / p) (W / p)`` tokens in row-major patch order.
    """

    def __init__(self, model: str, image: Tuple[int, int, int], patch_size: int, dim: int) -> None:
        super().__init__()
        c = image[0]
        self.num_patches = patch_count(model, image, patch_size)
        self.proj = nn.Conv2d(c, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class FeedForward(nn.Module):
    """``Linear(dim, hidden) - GELU - Dropout - Linear(hidden, dim) - Dropout`` on the last axis (the MLP
    block of a transformer layer and both MLPs of a Mixer layer)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention, written out:

        [q, k, v] = x W_in^T + b_in,   per head h:  A_h = softmax(q_h k_h^T / sqrt(d_h)),   y = [A_h v_h]_h W_out^T + b_out

    with the parameters laid out as ``nn.MultiheadAttention``'s (``in_proj`` holds W_q, W_k, W_v stacked). Its
    forward-mode derivative is the chain rule through these ops: ``d softmax(s) = A (s_dot - sum_j A_j s_dot_j)``,
    ``d(q k^T) = q_dot k^T + q k_dot^T`` (see the engine's reductions and linear rules).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"hidden_dim={dim} must be a multiple of num_heads={num_heads}.")
        self.num_heads = num_heads
        self.scale = 1.0 / math.sqrt(dim // num_heads)
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        n, s, d = x.shape
        # (N, S, 3D) -> 3 x (N, heads, S, D / heads)
        q, k, v = self.in_proj(x).view(n, s, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.dropout(torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1))
        return self.out_proj((attn @ v).transpose(1, 2).reshape(n, s, d))
