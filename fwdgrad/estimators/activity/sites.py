"""Where activity perturbation acts: a model's linear and conv layers ("sites"), and each layer's local rule.

A site is a layer ``z = layer(x)`` whose output an activity-perturbed estimator perturbs (or, for an output
layer, differentiates exactly). Whatever the estimate ``g_z`` of ``dL/dz`` (one row per example), the layer's
own gradient follows from its local rule, without any backward pass through the network:

    linear  z = x W^T + b:       dL/dW = sum_b g_z[b]^T x[b]   (one GEMM),   dL/db = sum_b g_z[b]
    conv    z = conv(x, W) + b:  dL/dW = conv_weight_grad(x, g_z)          dL/db = sum over (b, h, w) of g_z

(the weight gradient of a convolution from its input and output gradient: ``torch.nn.grad.conv2d_weight``).

A site whose output goes straight into a ReLU (the next module of an ``nn.Sequential``) has ``dL/dz = 0``
wherever ``z <= 0``; the estimate is masked there, which keeps it unbiased and removes the noise of the inactive
units (Ren et al. 2023 do the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from fwdgrad.errors import ConfigError
from fwdgrad.nn.local_losses import LocalBlock, head_linear

__all__ = ["Site", "probe", "trainable_layers", "model_sites", "local_sites", "layer_grads", "unused_layers"]

SITE_TYPES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True, eq=False)
class Site:
    """A linear/conv layer of the model, and how its output answers to the per-example loss matrix.

    ``row``/``groups``: its output units (dim 1: features or channels) are split into ``groups`` contiguous
    groups, group g answering to row ``row + g`` of the ``(rows, N)`` per-example losses. ``exact``: an output
    layer (the model's, or a local head), whose activity gradient is the loss's own derivative: no tangent.
    """

    name: str
    module: nn.Module
    exact: bool = False
    relu_after: bool = False
    row: int = 0
    groups: int = 1

    @property
    def perturbed(self) -> bool:
        return not self.exact


def _relu_fed(roots: Sequence[nn.Module]) -> set:
    """Ids of the layers whose next sibling in an ``nn.Sequential`` (anywhere under ``roots``) is a ReLU."""
    fed = set()
    for root in roots:
        for seq in root.modules():
            if isinstance(seq, nn.Sequential):
                kids = list(seq)
                fed |= {id(a) for a, b in zip(kids, kids[1:]) if isinstance(b, nn.ReLU)}
    return fed


def _check_layer(name: str, m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
        raise ConfigError(
            f"activity perturbation: conv layer {name} uses padding={m.padding!r}, padding_mode="
            f"{m.padding_mode!r}; its local rule supports numeric zero padding only."
        )


def _check_coverage(model: nn.Module, sites: Sequence[Site]) -> None:
    """Every trainable parameter must belong to a site, or it would silently get no gradient."""
    covered = {id(p) for s in sites for p in s.module.parameters()}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            raise ConfigError(
                f"activity perturbation estimates the parameters of nn.Linear and nn.Conv2d layers only, but "
                f"{name} belongs to another module; use another estimator for this model (e.g. "
                "gradient=forward), or freeze that parameter."
            )


def trainable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, SITE_TYPES) and any(p.requires_grad for p in m.parameters())]


def probe(model: nn.Module, layers: Sequence[Tuple[str, nn.Module]], x: Tensor
          ) -> Tuple[List[str], Dict[str, Tuple[int, ...]]]:
    """The layers ``model(x)`` calls, in call order, and each one's output shape per example: one no-grad pass
    on the first example of ``x``."""
    order: List[str] = []
    shapes: Dict[str, Tuple[int, ...]] = {}

    def seen(name: str, out: Tensor) -> None:
        if name not in shapes:
            order.append(name)
        shapes[name] = tuple(out.shape[1:])

    handles = [m.register_forward_hook(lambda mod, a, out, name=n: seen(name, out)) for n, m in layers]
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    return order, shapes


def model_sites(model: nn.Module, exact_output_layer: bool, order: Sequence[str]) -> List[Site]:
    """The trainable linear/conv layers the model's forward calls (``order``, from :func:`probe`), all answering
    to row 0; the last one called is the output layer (exact) if ``exact_output_layer`` (checked against the
    model's output at every pass). Layers it never calls (e.g. auxiliary heads switched off) are not sites:
    the loss does not depend on them."""
    fed = _relu_fed([model])
    modules = dict(trainable_layers(model))
    if not order:
        raise ConfigError(f"{type(model).__name__} calls no trainable nn.Linear/nn.Conv2d layer to perturb.")
    sites = []
    for i, name in enumerate(order):
        _check_layer(name, modules[name])
        sites.append(Site(name, modules[name], exact=exact_output_layer and i == len(order) - 1,
                          relu_after=id(modules[name]) in fed))
    _check_coverage(model, [Site(n, m) for n, m in modules.items()])
    return sites


def local_sites(model: nn.Module, blocks: Sequence[LocalBlock]) -> List[Site]:
    """The sites of a model trained with local losses: every body layer perturbed, answering to its block's
    rows (one per unit group), and every head's linear layer exact."""
    names = {id(m): n for n, m in model.named_modules()}
    fed = _relu_fed([blk.body for blk in blocks])
    sites, row = [], 0
    for j, blk in enumerate(blocks):
        body = [m for m in blk.body.modules() if isinstance(m, SITE_TYPES)]
        if blk.groups > 1 and len(body) != 1:
            raise ConfigError(
                f"model.local_groups={blk.groups} needs exactly one linear/conv layer per block (block {j} has "
                f"{len(body)}): a group's loss must depend on its own units only."
            )
        for m in body:
            _check_layer(names[id(m)], m)
            sites.append(Site(names[id(m)], m, relu_after=id(m) in fed, row=row, groups=blk.groups))
        head = head_linear(blk.head)
        sites.append(Site(names[id(head)], head, exact=True, row=row))
        row += blk.groups
    _check_coverage(model, sites)
    return sites


def layer_grads(module: nn.Module, x: Tensor, gz: Tensor) -> Dict[str, Tensor]:
    """The layer's parameter gradients from its input ``x`` and the (estimated) gradient ``gz`` of its output
    (the local rules of the module docstring)."""
    out: Dict[str, Tensor] = {}
    if isinstance(module, nn.Linear):
        m, n = module.out_features, module.in_features
        g2, x2 = gz.reshape(-1, m), x.reshape(-1, n)
        out["weight"] = g2.T @ x2
        if module.bias is not None:
            out["bias"] = g2.sum(0)
    else:
        out["weight"] = torch.nn.grad.conv2d_weight(x, module.weight.shape, gz, module.stride, module.padding,
                                                    module.dilation, module.groups)
        if module.bias is not None:
            out["bias"] = gz.sum(dim=(0, 2, 3))
    return {k: v for k, v in out.items() if getattr(module, k).requires_grad}


def unused_layers(model: nn.Module, sites: Sequence[Site]) -> List[nn.Module]:
    """Trainable linear/conv layers that are not sites: the loss does not depend on them (gradient zero)."""
    used = {id(s.module) for s in sites}
    return [m for _, m in trainable_layers(model) if id(m) not in used]
