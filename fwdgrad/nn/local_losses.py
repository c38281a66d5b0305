"""Networks trained with local losses (Ren et al. 2023, "Scaling Forward Gradient with Local Losses"): the model
is cut into blocks, each block gets a small auxiliary classifier (its *head*) and its own loss, and the input of
every block is detached, so block j's loss depends only on block j's parameters:

    h_0 = x,   h_j = body_j(sg(h_{j-1})),   L_j = mean_b CE(head_j(h_j), y_b),   sg = stop-gradient

The last block's head is the model's own output layer, so ``L_last`` is the usual loss and evaluation uses the
final head. Because the blocks are detached, ``grad_{theta_j} sum_i L_i = grad_{theta_j} L_j``: backprop through
the sum of the local losses ("LG-BP") trains every block on its own loss, and a forward gradient per block
estimates its own local loss's gradient.

Unit groups (Ren et al., Sec. 4): the head's input features are split into G contiguous groups, and group g has
its own loss, computed from logits in which only group g's features are live:

    logits_g = h_g W_g^T + b / G + sg(h W^T + b - h_g W_g^T - b / G)

Every ``logits_g`` equals the head's logits in value, and the live parts add up to them
(``sum_g (h_g W_g^T + b / G) = h W^T + b``), so ``sum_g L_g`` has exactly the gradient of the ungrouped loss
``L_j`` (with G times its value): the groups change no target gradient. What they change is what a forward-mode pass sees: a tangent on group g's units moves only ``L_g``, so
an activity-perturbed estimate gets one directional derivative per group, with a variance that grows with the
group's width instead of the layer's (:mod:`fwdgrad.estimators.activity.forward_activity`).

The model keeps its ordinary layers (same parameter names with or without local losses) and adds the auxiliary
heads; :meth:`local_blocks` returns *views*: :class:`LocalBlock` modules holding the model's own layers.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fwdgrad.errors import ConfigError

__all__ = ["SpatialMean", "TokenMean", "LocalBlock", "aux_head", "head_linear", "group_logits", "replicated_logits",
           "local_blocks", "check_groups", "require_detached"]


class SpatialMean(nn.Module):
    """``(N, C, H, W) -> (N, C)``: the mean over the spatial positions (a conv block's auxiliary head reads it)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def aux_head(features: int, num_classes: int, spatial: bool = False) -> nn.Module:
    """A block's auxiliary classifier: a linear layer, after a spatial mean for conv features."""
    linear = nn.Linear(features, num_classes)
    return nn.Sequential(SpatialMean(), linear) if spatial else linear


def head_linear(head: nn.Module) -> nn.Linear:
    """The linear layer that produces a head's logits (the head itself, or its last module)."""
    last = head[-1] if isinstance(head, nn.Sequential) else head
    if not isinstance(last, nn.Linear):
        raise ConfigError(f"a local head must end in an nn.Linear, got {type(last).__name__}.")
    return last


class LocalBlock(nn.Module):
    """One block of a network trained with local losses: ``body`` (the model's own layers) and ``head`` (its
    classifier).

    ``forward(h)`` returns the head's logits ``head(body(h))``.

    * ``groups``: unit groups of the head's input features (1: one loss per block).
    * ``patches``: 0 for features ``(N, F)`` or ``(N, C, H, W)`` (groups along dim 1); P for token features
      ``(N, P, D)`` read by a head ``(TokenMean, Linear)`` (groups along the last dim), with one loss per patch
      (patch-wise losses) when P > 1 (:func:`replicated_logits`).
    * ``detach``: the block's input is detached from the previous block (block-wise losses, the default); False
      lets a loss's gradient flow into earlier blocks (only an estimator that differentiates the sum of the
      local losses in one call can follow that: backprop, "L-BP").
    * ``answers``: for a model that declares it, which loss rows each perturbed layer's output units answer to
      (``(layer, "group" | "patch")``: the rows of the unit's own group and patch, or every group's row of its
      patch); None: every body layer's units answer to their own group's row (one layer per block when grouped).
    """

    def __init__(self, body: nn.Sequential, head: nn.Module, groups: int = 1, patches: int = 0,
                 detach: bool = True, answers: Optional[Sequence[Tuple[nn.Module, str]]] = None) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.groups = int(groups)
        self.patches = int(patches)
        self.detach = bool(detach)
        self.answers = None if answers is None else tuple(answers)  # a tuple: the layers are not registered twice

    @property
    def rows(self) -> int:
        """The number of local losses of the block: one per (patch, group)."""
        return self.groups * max(self.patches, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.body(h))

    def row_logits(self, h: Tensor, logits: Tensor) -> Tensor:
        """The logits of each of the block's losses, ``(rows, N, C)``, from the body's output ``h`` and the head's
        ``logits``: every row equals ``logits`` in value; only its own units are live (module docstring)."""
        linear = head_linear(self.head)
        if self.patches:
            return replicated_logits(h, logits, linear, self.groups, self.patches > 1)
        features = h if linear is self.head else self.head[:-1](h)
        return group_logits(features, logits, linear, self.groups)


class TokenMean(nn.Module):
    """``(N, P, D) -> (N, D)``: the mean over the tokens (patches), the feature aggregator of a token model's
    head."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def replicated_logits(h: Tensor, logits: Tensor, linear: nn.Linear, groups: int, patchwise: bool) -> Tensor:
    """The logits of the patch- and group-wise losses with the replicated feature aggregator (Ren et al. 2023,
    Sec. 4), ``(P G, N, C)`` row ``p G + g`` (``(G, N, C)`` when not ``patchwise``).

    For the head ``logits = mean_p(h_p) W^T + b`` on token features ``h`` ``(N, P, D)``, the loss of patch p and
    group g sees every other patch and group through a stop-gradient:

        logits_{p,g} = live_{p,g} + sg(logits - live_{p,g}),   live_{p,g} = (1/P) h_{p,g} W_g^T + b / (P G)

    so every row equals the global-pool logits in value, and the live parts add up to them
    (``sum_{p,g} live_{p,g} = logits``): the sum of the P G losses has exactly the gradient of the global-pool
    loss, while a perturbation of patch p's group-g units moves only loss (p, g). Only the ``(P, G, N, C)``
    live parts are formed (one batched product), never P G copies of the features."""
    n, p, d = h.shape
    w, b = linear.weight, linear.bias
    hg = h.reshape(n, p, groups, d // groups).permute(1, 2, 0, 3)  # (P, G, N, D/G)
    wg = w.reshape(w.shape[0], groups, d // groups).permute(1, 2, 0)  # (G, D/G, C)
    live = torch.matmul(hg, wg) / p  # (P, G, N, C)
    if b is not None:
        live = live + b / (p * groups)
    if not patchwise:
        live = live.sum(0, keepdim=True)  # one loss per group: every patch of the group is live
    rows = live.reshape(-1, n, live.shape[-1])
    return rows + (logits - rows).detach()


def build_blocks(bodies: Sequence[Sequence[nn.Module]], heads: Sequence[nn.Module], groups: int
                 ) -> Tuple[LocalBlock, ...]:
    """Views: one :class:`LocalBlock` per (body layers, head) pair (the layers are shared, not copied)."""
    if len(bodies) != len(heads):
        raise AssertionError("one head per block")  # pragma: no cover - the models build them in pairs
    return tuple(LocalBlock(nn.Sequential(*body), head, groups) for body, head in zip(bodies, heads))


def check_groups(groups: int, widths: Sequence[int]) -> int:
    """Validate ``model.local_groups`` against the heads' input widths (each must split into equal groups)."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"model.local_groups must be an integer >= 1 (unit groups per block), got {groups!r}.")
    bad = [w for w in widths if w % groups]
    if bad:
        raise ConfigError(
            f"model.local_groups={groups} does not divide the width {bad[0]} of a block's output; choose a "
            f"divisor of every block width ({', '.join(map(str, widths))})."
        )
    return groups


def group_logits(features: Tensor, logits: Tensor, linear: nn.Linear, groups: int) -> Tensor:
    """The G group logits of a head, ``(G, N, C)`` (module docstring): each equals ``logits`` in value, and
    only group g's slice of ``features`` (the linear layer's input, ``(N, F)``) is live in ``logits[g]``."""
    if groups == 1:
        return logits.unsqueeze(0)
    n, f = features.shape
    w, b = linear.weight, linear.bias
    # P_g = h_g W_g^T for every group at once: (G, N, F/G) @ (G, F/G, C) -> (G, N, C)
    hg = features.reshape(n, groups, f // groups).transpose(0, 1)
    wg = w.reshape(w.shape[0], groups, f // groups).permute(1, 2, 0)
    live = torch.matmul(hg, wg)
    if b is not None:
        live = live + b / groups
    return live + (logits - live).detach()


def local_blocks(model: nn.Module) -> Optional[Tuple[LocalBlock, ...]]:
    """The model's blocks if it is trained with local losses (``model.local_losses``), else None.

    Contract for such a model: ``model(x)`` equals chaining the blocks' bodies and applying the last head
    (``h = x; for blk in blocks: h = blk.body(h); head_last(h)``), and every trainable parameter belongs to a
    block (its body or its head).
    """
    if not getattr(model, "local_losses", False):
        return None
    make = getattr(model, "local_blocks", None)
    if make is None:
        raise ConfigError(
            f"{type(model).__name__} has local_losses set but no local_blocks(); local losses are available for "
            "model=mlp, model=conv and model=local_mixer."
        )
    return make()


def require_detached(blocks: Sequence[LocalBlock], estimator: str) -> None:
    """Refuse blocks whose input is not detached for an estimator that estimates each block's loss on its own (a
    loss that reaches earlier blocks would need their parameters too)."""
    if not all(blk.detach for blk in blocks):
        raise ConfigError(
            f"{estimator} estimates every block's own local loss, which needs the blocks detached from each other "
            "(model.local_detach=true, block-wise losses); with local_detach=false (gradients flowing end to end, "
            "\"L-BP\") use gradient=backprop."
        )
