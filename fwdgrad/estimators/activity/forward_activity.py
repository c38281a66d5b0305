"""Activity-perturbed forward gradients (FG-A; Ren et al. 2023, "Scaling Forward Gradient with Local Losses").

Instead of the weights, perturb every layer's *output* ``z`` (per example: ``z_b``, m units) along a tangent
``u_b`` with ``E[u u^T] = I``. One forward-mode pass gives, for every example, the directional derivative of its
own loss

    d_b = <dl_b/dz_b, u_b>          (the derivative of l_b along a perturbation u of every layer's output)

and ``g_b = d_b u_b`` is an unbiased estimate of the activity gradient ``dl_b/dz_b``
(``E[u u^T dl/dz] = dl/dz``). The layer's weight gradient follows by its local rule (:mod:`.sites`; a linear
layer: ``g_W = (1/N) sum_b g_b x_b^T``, one GEMM), with no backward pass through the network. The variance grows
with the number of perturbed units per example, not with the number of weights (n = 1.86 M for the default MLP,
2,048 perturbed units). Implementation: every perturbed layer's output becomes ``z + eps`` with ``eps = 0``, and
the pass differentiates the per-example losses with respect to ``eps`` along the tangents ``u`` (as Ren et al.'s
``jax.jvp`` over zero noise); :func:`fwdgrad.engine.forward_tangents` returns the tangent of that vector output.

* The output layer's gradient is exact by default: it needs only the loss's derivative with respect to the
  logits, a backward through the loss function, not the network (as Ren et al. do).
* ``num_tangents`` k: k tangents per example, combined per example by ``aggregation`` (mean, sum or
  projection onto the span of the example's k tangents; other aggregations do not apply per example).
* Local losses (``model.local_losses``): every block's units answer to the block's own loss (its input is
  detached, so the tangents stop at block boundaries) and every head is exact ("LG-FG-A"); with unit groups
  each group's units answer to the group's loss. One pass for all blocks.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fwdgrad.engine import add_perturbation, zero_perturbation
from fwdgrad.errors import ConfigError
from fwdgrad.estimators.activity.sites import (
    Site,
    layer_grads,
    local_sites,
    model_sites,
    probe,
    trainable_layers,
    unused_layers,
)
from fwdgrad.estimators.backends import BackendDispatch, PassStateDict
from fwdgrad.estimators.base import GradientEstimator, LossFn, OutputLoss, Params, mean_loss
from fwdgrad.estimators.memory_policy import TangentMemoryPolicy
from fwdgrad.estimators.step_randomness import SameRandomness, randomness_untouched
from fwdgrad.estimators.tangents.distributions import TANGENT_DISTRIBUTIONS, DrawContext, dense_tangent
from fwdgrad.estimators.tangents.rng import ChunkedRNG, SeededGenerators
from fwdgrad.nn.local_losses import LocalBlock, local_blocks, require_detached

__all__ = ["ForwardActivity", "ACTIVITY_AGGREGATIONS", "per_example_coefficients"]

#: The aggregations that apply per example (the others combine tangents over the whole parameter vector).
ACTIVITY_AGGREGATIONS = ("mean", "sum", "projection")
Records = Dict[str, Tuple[Tensor, Tensor]]  # site name -> (its input x, its output z), primal


class ForwardActivity(PassStateDict, SeededGenerators, GradientEstimator):
    """FG-A (module docstring). A module-level estimator: used through
    :func:`~fwdgrad.estimators.estimate_module_grads` (the training loop does), with per-example losses.

    Args:
        num_tangents: k >= 1 tangents per example.
        aggregation: ``mean`` | ``sum`` | ``projection``, per example (and per loss row).
        distribution: a dense key of :data:`~fwdgrad.estimators.TANGENT_DISTRIBUTIONS` (``normal``,
            ``rademacher``, or a registered sampler); ``rank1`` structures weight matrices and does not apply.
        seed: seed of the estimator's own generator.
        exact_output_layer: the output layer's gradient exactly from the loss's derivative (default), or
            perturbed like the other layers (models without local losses; local heads are always exact).
        backend: ``auto`` | ``fast`` | ``func`` (:mod:`~fwdgrad.estimators.backends`).
        max_tangent_mib: run k > 1 tangents in groups so that no intermediate tangent exceeds about this.
    """

    def __init__(self, num_tangents: int = 1, aggregation: str = "mean", distribution: str = "normal",
                 seed: int = 0, exact_output_layer: bool = True, backend: str = "auto",
                 max_tangent_mib: float = 256.0) -> None:
        if isinstance(num_tangents, bool) or not isinstance(num_tangents, int) or num_tangents < 1:
            raise ConfigError(f"num_tangents must be an integer >= 1 (tangents per example), got {num_tangents!r}.")
        if aggregation not in ACTIVITY_AGGREGATIONS:
            raise ConfigError(
                f"aggregation {aggregation!r} does not apply to activity perturbation, which combines each "
                f"example's own tangents; allowed: {', '.join(ACTIVITY_AGGREGATIONS)}."
            )
        if distribution == "rank1":
            raise ConfigError(
                "distribution 'rank1' structures weight matrices (u v^T); activity tangents are one vector per "
                "example: use normal or rademacher."
            )
        self.num_tangents, self.aggregation, self.distribution = num_tangents, aggregation, distribution
        self.tangent_distribution = TANGENT_DISTRIBUTIONS.lookup(distribution)
        self.seed = int(seed)
        self.exact_output_layer = bool(exact_output_layer)
        self.dispatch = BackendDispatch(backend)
        self.memory = TangentMemoryPolicy(num_tangents, False, max_tangent_mib)
        self.rng = ChunkedRNG()
        self._generators: Dict[torch.device, torch.Generator] = {}
        self._sites: Optional[tuple] = None  # (weakref to the model, its key, sites, shapes): see _structure

    def compute(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        raise ConfigError(
            "gradient=forward_activity perturbs a model's layer outputs, so it needs the model, not only a loss "
            "of its parameters: use it through fwdgrad.estimate_module_grads (as the training loop does), with "
            "a loss that returns one value per example."
        )

    def describe(self) -> Dict[str, object]:
        out: Dict[str, object] = {"estimator": type(self).__name__, "num_tangents": self.num_tangents,
                                  "aggregation": self.aggregation, "distribution": self.distribution,
                                  "seed": self.seed, "exact_output_layer": self.exact_output_layer}
        out.update(self.dispatch.describe())
        return out

    # -- the module-level hook --------------------------------------------------------------------------------
    def estimate_module(self, model: nn.Module, loss_of_output: OutputLoss, inputs: Tuple[Tensor, ...]) -> Tensor:
        """Write the FG-A estimate into every trainable parameter's ``.grad``; returns the output layer's loss."""
        blocks = local_blocks(model)
        if blocks is not None:
            require_detached(blocks, "gradient=forward_activity")
        sites, shapes = self._structure(model, blocks, inputs[0])
        perturbed = [s for s in sites if s.perturbed]
        x0 = inputs[0]
        eps = {s.name: zero_perturbation(x0, (x0.shape[0], *shapes[s.name])) for s in perturbed}  # one element each
        tangents = {name: dense_tangent(t) for name, t in self.tangent_distribution.draw(
            eps, self.num_tangents, DrawContext(self.generator, self.rng)).tangents.items()} if eps else {}
        losses, d, records = self._pass(model, blocks, sites, loss_of_output, inputs, eps, tangents)
        n = losses.shape[1]
        coeff = per_example_coefficients(self.aggregation, perturbed, tangents, d, losses.shape[0]) / n
        for s in sites:
            x, z = records[s.name]
            gz = _exact_activity_grad(z, loss_of_output) if s.exact else _estimate(s, tangents[s.name], coeff, z)
            for key, g in layer_grads(s.module, x, gz).items():
                getattr(s.module, key).grad = g.to(getattr(s.module, key).dtype)
        for m in unused_layers(model, sites):  # the loss does not depend on them
            for p in m.parameters():
                p.grad = torch.zeros_like(p) if p.requires_grad else None
        return losses[sites[-1].row].mean()

    def _structure(self, model: nn.Module, blocks: Optional[Sequence[LocalBlock]], x: Tensor
                   ) -> Tuple[List[Site], Dict[str, Tuple[int, ...]]]:
        """The sites and each one's output shape per example; found by a one-example probe pass and kept
        while the model, its local-loss settings and the input's shape stay the same."""
        key = (tuple(id(m) for m in model.modules()), getattr(model, "local_losses", False),
               getattr(model, "local_groups", 1), tuple(x.shape[1:]), x.dtype, x.device)
        cached = self._sites
        if cached is None or cached[0]() is not model or cached[1] != key:
            with randomness_untouched([x.device]):  # the probe is not part of the step: the step's stream stays
                order, shapes = probe(model, trainable_layers(model), x)
            sites = local_sites(model, blocks) if blocks is not None else model_sites(
                model, self.exact_output_layer, order)
            cached = self._sites = (weakref.ref(model), key, sites, shapes)
        return cached[2], cached[3]

    def _pass(self, model: nn.Module, blocks: Optional[Sequence[LocalBlock]], sites: Sequence[Site],
              loss_of_output: OutputLoss, inputs: Tuple[Tensor, ...], eps: Dict[str, Tensor],
              tangents: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Records]:
        """The per-example losses ``(rows, N)``, their tangents ``d`` (``(k, rows, N)``) and every site's primal
        input and output."""
        records: Records = {}

        def f(e: Dict[str, Tensor]) -> Tensor:
            return _perturbed_losses(model, blocks, sites, loss_of_output, inputs, e, records)

        if not eps:  # nothing perturbed (every layer exact): no tangent to propagate
            with torch.no_grad():
                losses = f(eps)
            d = losses.new_zeros((self.num_tangents, *losses.shape))
        else:
            replay = SameRandomness(t.device for t in eps.values())
            losses, d = self.dispatch(f, eps, tangents, self.num_tangents, self.memory, vector=True, replay=replay)
            if not self.dispatch.uses_fast:  # torch.func's tensors do not outlive its transforms: record plainly
                replay.restore()  # the same dropout masks as the pass that gave d
                with torch.no_grad():
                    f(eps)
        return losses, d, {name: (x.detach(), z.detach()) for name, (x, z) in records.items()}


def _perturbed_losses(model: nn.Module, blocks: Optional[Sequence[LocalBlock]], sites: Sequence[Site],
                      loss_of_output: OutputLoss, inputs: Tuple[Tensor, ...], eps: Dict[str, Tensor],
                      records: Records) -> Tensor:
    """The forward pass with ``z + eps`` at every perturbed site: per-example losses ``(rows, N)``."""

    def hook(site: Site, module: nn.Module, args: tuple, out: Tensor) -> Optional[Tensor]:
        records[site.name] = (args[0], out)
        return add_perturbation(out, eps[site.name]) if site.perturbed else None  # z + eps at eps = 0

    handles = [s.module.register_forward_hook(lambda m, a, o, s=s: hook(s, m, a, o)) for s in sites]
    try:
        if blocks is None:
            out = model(*inputs)
            if sites[-1].exact and records[sites[-1].name][1] is not out:
                raise ConfigError(
                    f"exact_output_layer: the last linear/conv layer ({sites[-1].name}) does not produce the "
                    "model's output; set gradient.exact_output_layer=false for this model."
                )
            return _per_example(loss_of_output(out).unsqueeze(0), inputs[0].shape[0], 1)
        rows, h = [], inputs[0]
        for blk in blocks:
            h = blk.body(h.detach())  # detached: tangents stop at the block boundary
            grouped = blk.row_logits(h, blk.head(h))  # (rows, N, C): one per unit group (and patch)
            rows.append(_per_example(loss_of_output(grouped), h.shape[0], blk.rows))
        return torch.cat(rows)
    finally:
        for handle in handles:
            handle.remove()


def _per_example(loss: Tensor, n: int, groups: int) -> Tensor:
    """``loss`` checked to be ``(groups, n)``: one loss per example (and local loss row: unit group and patch, the
    loss function having been given the rows' logits stacked in front, ``(groups, n, C)``)."""
    if loss.shape != (groups, n):
        raise ConfigError(
            f"activity perturbation needs one loss per example{' and unit group' if groups > 1 else ''} (shape "
            f"{(groups, n) if groups > 1 else (n,)}), but the loss has shape {tuple(loss.shape[1:] if groups == 1 else loss.shape)}; "
            "return per-example losses (fwdgrad.nn.functional.per_example_cross_entropy does, also for logits with "
            "a leading group dimension)."
        )
    return loss


def per_example_coefficients(aggregation: str, sites: Sequence[Site], tangents: Dict[str, Tensor], d: Tensor,
                             rows: int) -> Tensor:
    """The coefficients ``c`` (``(k, rows, N)``) of each example's estimate ``g_b = sum_i c_i u_{b,i}`` for every
    loss row: ``d/k`` (mean), ``d`` (sum), or ``(U^T U)^{-1} d`` with ``U`` the example's k tangents over the
    units answering to the row (projection onto their span; exact when k equals that number of units)."""
    k = d.shape[0]
    if aggregation == "mean":
        return d / k
    if aggregation == "sum":
        return d
    n = d.shape[2]
    gram = torch.zeros(n, rows, k, k, dtype=torch.float64, device=d.device)
    for s in sites:
        if not s.patches:
            u = tangents[s.name].reshape(k, n, s.groups, -1).permute(1, 2, 0, 3).to(torch.float64)  # (N, G, k, X)
            gram[:, s.row:s.row + s.groups] += u @ u.transpose(-1, -2)
            continue
        # token layout: the units answering to row (p', g) are those of patch p' (all patches when one loss covers
        # them) and group g (all groups for a "patch" unit): (N, P', G', k, X), then added to every row they reach
        t = tangents[s.name]
        p_all, width = t.shape[2], t.shape[3]
        pr = s.patch_rows
        gr = s.groups if s.answers == "group" else 1
        u = t.reshape(k, n, pr, p_all // pr, gr, width // gr).permute(1, 2, 4, 0, 3, 5)
        u = u.reshape(n, pr, gr, k, -1).to(torch.float64)
        block = gram[:, s.row:s.row + s.rows].view(n, pr, s.groups, k, k)
        block += u @ u.transpose(-1, -2)  # broadcast over the groups when gr = 1
    rhs = d.permute(2, 1, 0).to(torch.float64).unsqueeze(-1)  # (N, rows, k, 1)
    chol, info = torch.linalg.cholesky_ex(gram)
    if bool((info == 0).all()):
        c = torch.cholesky_solve(rhs, chol)
    else:  # linearly dependent tangents (k > units): the least-squares solution still projects
        c = torch.linalg.pinv(gram, hermitian=True) @ rhs
    return c.squeeze(-1).permute(2, 1, 0).to(d.dtype)


def _estimate(site: Site, u: Tensor, coeff: Tensor, z: Tensor) -> Tensor:
    """``g_z[b] = sum_i c[i, row(unit), b] u[i, b, unit]``, zero where a following ReLU is inactive."""
    k, n, ch = u.shape[0], u.shape[1], u.shape[2]
    if site.patches:  # token layout (k, N, P, D): coefficients (k, N, P', G) with P' = P or 1
        pr = site.patch_rows
        c = coeff[:, site.row:site.row + site.rows, :].permute(0, 2, 1).reshape(k, n, pr, site.groups)
        if site.answers == "patch":
            c = c.sum(3, keepdim=True)  # the unit reaches every group's loss of its patch
        elif site.groups > 1:
            c = c.repeat_interleave(u.shape[3] // site.groups, dim=3)  # (k, N, P', D)
    else:
        c = coeff[:, site.row:site.row + site.groups, :].permute(0, 2, 1)  # (k, N, G)
        if site.groups > 1:
            c = c.repeat_interleave(ch // site.groups, dim=2)  # (k, N, channels)
        c = c.reshape(k, n, c.shape[2], *([1] * (u.dim() - 3)))
    g = (u[0] * c[0]) if k == 1 else (u * c).sum(0)
    if site.relu_after:  # ReLU's own backward rule: g where z > 0, else 0 (one fused pass; masked_fill_ is ~10x slower)
        g = torch.ops.aten.threshold_backward(g, z, 0)
    return g


def _exact_activity_grad(z: Tensor, loss_of_output: OutputLoss) -> Tensor:
    """``dL/dz`` of the mean loss at the output layer's output: a backward through the loss function only."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(mean_loss(loss_of_output(leaf)), leaf)
    return g
