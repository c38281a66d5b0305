"""LocalMixer (Ren, Kornblith, Liao & Hinton 2023, "Scaling Forward Gradient With Local Losses", Secs. 4-5): an
MLP-Mixer built for local learning.

An image is cut into P non-overlapping patches (tokens), each a vector of ``C p^2`` pixels, and mapped to D
channels. Every linear layer is followed by a layer norm local to each patch (and to each group in a grouped
layer), without learned scale or shift, then a ReLU:

    block 0:     h = relu(LN(x W_0^T + b_0)),              y = relu(LN_g(h W_1^T + b_1))        (W_1 grouped)
    block j > 0: t = relu(LN(h^T W_t^T + b_t)^T)           token mixing: one linear layer across the P patches
                 c = relu(LN(t W_c^T + b_c))               channel mixing, dense
                 y = relu(LN_g(c W_g^T + b_g) + h)         channel mixing, grouped (channels meet only within
                                                           their group), residual

Grouped: the D channels are cut into G groups of D/G, and the weight is block diagonal (G blocks of
D/G x D/G). The classifier averages the last block's tokens and applies a linear layer.

Local losses (``local_losses=True``; :mod:`fwdgrad.nn.local_losses`): every block gets its own linear head on the
average of its tokens, and, with the replicated feature aggregator, one loss per patch and group (patch-wise and
group-wise losses, :func:`~fwdgrad.nn.local_losses.replicated_logits`). The blocks are detached from each other
(block-wise losses; ``local_detach=False`` lets the local losses' gradients flow end to end: "L-BP"), and the
classifier reads the last block's output through a stop-gradient (a linear readout trained on the global loss,
as in the paper's code). Which losses each layer's units answer to is declared for activity perturbation:
a grouped layer's input and output channels, and the dense channel-mixing layer's outputs (which feed a grouped
layer), answer to their group's loss at their patch; the token-mixing layer's outputs at patch p answer to every
group's loss at p (the dense channel mixing after them meets all groups).

Sizes of the paper's Table 2 (blocks / patches / channels / groups): S/1/1 1 / 1x1 / 256 / 1 and M/1/16 1 / 1x1 /
512 / 16 on MNIST (one patch: the whole 28x28 image); M/8/16 4 / 8x8 / 512 / 16 on CIFAR-10.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fwdgrad.errors import ConfigError
from fwdgrad.nn.local_losses import LocalBlock, TokenMean
from fwdgrad.nn.models.basic import image_shape
from fwdgrad.nn.models.layers import patch_count

__all__ = ["NormLinear", "TokenMixing", "MixerBlock", "LocalMixer", "patchify"]


def _init_linear(weight: Tensor, bias: Tensor, fan_in: int) -> None:
    """PyTorch's ``nn.Linear`` initialisation: uniform in +-1/sqrt(fan_in) (each group's fan-in when grouped)."""
    bound = fan_in ** -0.5
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class NormLinear(nn.Module):
    """``LN_g(x W^T + b)`` on the last axis: a linear layer (grouped when ``groups > 1``: block-diagonal weight,
    group g's outputs read group g's inputs only), then a layer norm over each group's outputs, no learned
    scale or shift. ``(..., in) -> (..., out)``; weight ``(groups, out/groups, in/groups)``.

    A site of activity perturbation (:mod:`fwdgrad.estimators.activity.sites`): its output is perturbed after the
    norm, and its local rule is the vector-Jacobian product of this layer alone (the linear map and its norm).
    """

    def __init__(self, in_features: int, out_features: int, groups: int = 1, eps: float = 1e-5) -> None:
        super().__init__()
        if groups < 1 or in_features % groups or out_features % groups:
            raise ConfigError(
                f"a grouped layer needs groups ({groups}) dividing its widths ({in_features} -> {out_features}); "
                "choose model.groups as a divisor of model.channels."
            )
        self.in_features, self.out_features, self.groups, self.eps = in_features, out_features, groups, eps
        self.weight = nn.Parameter(torch.empty(groups, out_features // groups, in_features // groups))
        self.bias = nn.Parameter(torch.empty(out_features))
        _init_linear(self.weight, self.bias, in_features // groups)

    def forward(self, x: Tensor) -> Tensor:
        lead, g = x.shape[:-1], self.groups
        if g == 1:
            z = F.linear(x, self.weight[0], self.bias)
        else:
            xg = x.reshape(-1, g, self.in_features // g).transpose(0, 1)  # (G, M, in/G)
            z = torch.matmul(xg, self.weight.transpose(1, 2)).transpose(0, 1).reshape(*lead, self.out_features)
            z = z + self.bias
        zg = z.reshape(*lead, g, self.out_features // g)
        return F.layer_norm(zg, (self.out_features // g,), eps=self.eps).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, groups={self.groups}"


class TokenMixing(nn.Module):
    """``LN(h^T W^T + b)^T``: one linear layer across the P patches of every channel, then a layer norm over each
    patch's D channels. ``(N, P, D) -> (N, P, D)``; weight ``(P, P)``."""

    def __init__(self, patches: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.patches, self.eps = patches, eps
        self.weight = nn.Parameter(torch.empty(patches, patches))
        self.bias = nn.Parameter(torch.empty(patches))
        _init_linear(self.weight, self.bias, patches)

    def forward(self, h: Tensor) -> Tensor:
        z = F.linear(h.transpose(1, 2), self.weight, self.bias).transpose(1, 2)
        return F.layer_norm(z, (z.shape[-1],), eps=self.eps)

    def extra_repr(self) -> str:
        return f"patches={self.patches}"


class MixerBlock(nn.Module):
    """A residual block ``relu(mlp(h) + h)``, ``mlp`` = token mixing, ReLU, dense channel mixing, ReLU, grouped
    channel mixing (module docstring)."""

    def __init__(self, patches: int, channels: int, groups: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(TokenMixing(patches), nn.ReLU(), NormLinear(channels, channels), nn.ReLU(),
                                 NormLinear(channels, channels, groups))

    def forward(self, h: Tensor) -> Tensor:
        return torch.relu(self.mlp(h) + h)


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """``(N, C, H, W) -> (N, P, C p^2)``: non-overlapping ``p x p`` patches in row-major order, each flattened
    channel-major."""
    n, c, h, w = x.shape
    p = patch_size
    return (x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
            .reshape(n, (h // p) * (w // p), c * p * p))


class Patchify(nn.Module):
    """:func:`patchify` as a module."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: Tensor) -> Tensor:
        return patchify(x, self.patch_size)


class LocalMixer(nn.Module):
    """LocalMixer classifier (module docstring).

    Args:
        input_shape: ``(C, H, W)``; ``patch_size`` must divide H and W (0: one patch, the whole image).
        num_classes: outputs of the classifier.
        num_blocks: blocks (the first is the patch embedding block, the others residual mixer blocks).
        patch_size: side of the square patches in pixels (28 on 28x28 images: the paper's "1" patch).
        channels: D, channels per patch. groups: G, channel groups of the grouped layers and of the losses.
        local_losses: every block trained on its own losses (and the classifier as a readout).
        local_detach: block-wise losses (each block's input detached); False: "L-BP".
        patch_losses / group_losses: one loss per patch / per group (the replicated aggregator); False: one loss
            per block over all patches / groups.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        num_blocks: int = 1,
        patch_size: int = 0,
        channels: int = 256,
        groups: int = 1,
        local_losses: bool = False,
        local_detach: bool = True,
        patch_losses: bool = True,
        group_losses: bool = True,
    ) -> None:
        super().__init__()
        c, h, w = image_shape("LocalMixer", input_shape)
        if patch_size == 0:
            if h != w:
                raise ConfigError(f"LocalMixer: patch_size=0 (one patch) needs square images, got {h}x{w}.")
            patch_size = h
        self.num_patches = patch_count("LocalMixer", (c, h, w), patch_size, hint="; 0 for one patch")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ConfigError(f"LocalMixer: num_blocks must be an integer >= 1, got {num_blocks!r}.")
        if (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or channels % groups
                or channels // groups < 2):
            raise ConfigError(
                f"LocalMixer: groups={groups!r} must be an integer >= 1 dividing channels={channels} into groups of "
                "at least 2 channels (a layer norm over one channel always outputs 0)."
            )
        self.patch_size, self.channels, self.groups = patch_size, channels, groups
        self.patchify = Patchify(patch_size)
        self.blocks = nn.ModuleList(
            [nn.Sequential(NormLinear(c * patch_size * patch_size, channels), nn.ReLU(),
                           NormLinear(channels, channels, groups), nn.ReLU())]
            + [MixerBlock(self.num_patches, channels, groups) for _ in range(num_blocks - 1)])
        self.pool = TokenMean()
        self.head = nn.Linear(channels, num_classes)
        self.local_losses = bool(local_losses)
        self.local_detach = bool(local_detach)
        self.patch_losses, self.group_losses = bool(patch_losses), bool(group_losses)
        self.local_groups = groups if self.group_losses else 1
        if self.local_losses:
            self.aux_heads = nn.ModuleList([nn.Linear(channels, num_classes) for _ in range(num_blocks)])

    def features(self, x: Tensor) -> Tensor:
        """The last block's tokens, ``(N, P, D)``."""
        h = self.patchify(x)
        for blk in self.blocks:
            h = blk(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)))

    def local_blocks(self) -> Tuple[LocalBlock, ...]:
        """The blocks (views on the model's layers), each with its auxiliary head and its patch/group losses, and
        a readout block (no body; the classifier on the detached last block), whose loss is the global one."""
        patches = self.num_patches if self.patch_losses else 1
        out: List[LocalBlock] = []
        for j, blk in enumerate(self.blocks):
            body = nn.Sequential(self.patchify, blk) if j == 0 else nn.Sequential(blk)
            if j == 0:
                answers = [(blk[0], "group"), (blk[2], "group")]
            else:
                answers = [(blk.mlp[0], "patch"), (blk.mlp[2], "group"), (blk.mlp[4], "group")]
            out.append(LocalBlock(body, nn.Sequential(TokenMean(), self.aux_heads[j]), self.local_groups, patches,
                                  detach=self.local_detach or j == 0, answers=answers))
        out.append(LocalBlock(nn.Sequential(), nn.Sequential(self.pool, self.head), 1, 1, detach=True, answers=[]))
        return tuple(out)
