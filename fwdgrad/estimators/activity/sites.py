"""Where activity perturbation acts: a model's linear and conv layers ("sites"), and each layer's local rule.

A site is a layer ``z = layer(x)`` whose output an activity-perturbed estimator perturbs (or, for an output
layer, differentiates exactly). Whatever the estimate ``g_z`` of ``dL/dz`` (one row per example), the layer's
own gradient follows from its local rule, without any backward pass through the network:

    linear  z = x W^T + b:       dL/dW = sum_b g_z[b]^T x[b]   (one GEMM),   dL/db = sum_b g_z[b]
    conv    z = conv(x, W) + b:  dL/dW = conv_weight_grad(x, g_z)          dL/db = sum over (b, h, w) of g_z

(the weight gradient of a convolution from its input and output gradient: ``torch.nn.grad.conv2d_weight``).

A layer with a norm inside it (:class:`~fwdgrad.nn.models.local_mixer.NormLinear`, ``TokenMixing``: a linear map and
a layer norm, perturbed after the norm) has for local rule the vector-Jacobian product of that one layer, a
backward pass through its own linear map and norm (as Ren et al. compute the norms' gradients), never beyond it.

A site whose output goes straight into a ReLU (the next module of an ``nn.Sequential``) has ``dL/dz = 0``
wherever ``z <= 0``; the estimate is masked there, which keeps it unbiased and removes the noise of the inactive
units (Ren et al. 2023 do the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from fwdgrad.errors import ConfigError
from fwdgrad.estimators.step_randomness import SameRandomness
from fwdgrad.nn.local_losses import LocalBlock, head_linear
from fwdgrad.nn.models.local_mixer import NormLinear, TokenMixing

__all__ = ["Site", "probe", "trainable_layers", "model_sites", "local_sites", "layer_grads", "unused_layers"]

SITE_TYPES = (nn.Linear, nn.Conv2d, NormLinear, TokenMixing)
NORMED_SITES = (NormLinear, TokenMixing)  # local rule: the layer's own vector-Jacobian product


@dataclass(frozen=True, eq=False)
class Site:
    """A linear/conv layer of the model, and how its output answers to the per-example loss matrix.

    ``row``/``groups``: its output units (dim 1: features or channels) are split into ``groups`` contiguous
    groups, group g answering to row ``row + g`` of the ``(rows, N)`` per-example losses. ``exact``: an output
    layer (the model's, or a local head), whose activity gradient is the loss's own derivative: no tangent.

    Token layout (``patches >= 1``: outputs ``(N, P, D)``, a block with patch-wise losses): the rows are
    ``row + p' groups + g`` for ``p' < patches`` (``patches`` is P with one loss per patch, 1 otherwise) and the
    groups split the last dim; ``answers`` is ``"group"`` (a unit answers to its own patch's and group's row) or
    ``"patch"`` (to every group's row of its patch).
    """

    name: str
    module: nn.Module
    exact: bool = False
    relu_after: bool = False
    row: int = 0
    groups: int = 1
    patches: int = 0
    answers: str = "group"

    @property
    def patch_rows(self) -> int:
        """P' in the token layout: P with one loss per patch, else 1 (1 in the plain layout too)."""
        return max(self.patches, 1)

    @property
    def rows(self) -> int:
        return self.groups * self.patch_rows

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
                f"activity perturbation estimates the parameters of nn.Linear and nn.Conv2d layers (and LocalMixer's "
                f"NormLinear and TokenMixing) only, but "
                f"{name} belongs to another module; use another estimator for this model (e.g. "
                "gradient=forward), or freeze that parameter."
            )


def trainable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, SITE_TYPES) and any(p.requires_grad for p in m.parameters())]


#: Reductions that compute a statistic over the dims they are given (all dims when none is given).
_REDUCTIONS = frozenset(f"{prefix}{name}" for prefix in ("", "TensorBase.", "_VariableFunctionsClass.")
                        for name in ("mean", "sum", "var", "std", "var_mean", "std_mean", "amax", "amin", "max",
                                     "min", "logsumexp", "norm", "prod", "softmax", "log_softmax", "median"))


def _reduced_dims(args: Sequence[object], kwargs: Dict[str, object]) -> object:
    dim = kwargs.get("dim", args[1] if len(args) > 1 and not isinstance(args[1], Tensor) else None)
    return dim


class _Recorder(TorchFunctionMode):
    """Watches one pass for the uses of layers, parameters and outputs that activity perturbation assumes."""

    def __init__(self, owner: Dict[int, Tuple[str, nn.Module]], running: List[nn.Module],
                 relu_fed_outputs: Dict[int, str], batch: int) -> None:
        super().__init__()
        self.owner, self.running, self.relu_fed_outputs, self.batch = owner, running, relu_fed_outputs, batch
        self.problems: List[str] = []

    def _batch_statistic(self, name: str, args: Sequence[object], kwargs: Dict[str, object]) -> bool:
        """A reduction (or batch norm with batch statistics) over the examples of a batch-shaped tensor."""
        short = name.rsplit(".", 1)[-1]
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if short == "batch_norm":
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            return bool(training)
        if (name not in _REDUCTIONS or x is None or id(x) in self.owner or x.dim() == 0 or x.shape[0] != self.batch
                or self.batch < 2):
            return False
        dims = _reduced_dims(args, kwargs)
        if dims is None:
            return short not in ("softmax", "log_softmax")  # (their dim is required in practice)
        dims = [dims] if isinstance(dims, int) else list(dims)
        return any(int(d) % x.dim() == 0 for d in dims)

    def _note(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(t.is_floating_point() for t in _tensors((out,), {})):
            return out  # metadata (.shape, .dim()), comparisons: nothing flows on from the inputs' values
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        if self._batch_statistic(name, args, kwargs):
            where = next((type(m).__name__ for m in reversed(self.running)), "the model")
            self._note(f"{name} computes a statistic over the examples of the batch (in {where}), so each example's "
                       "loss depends on the others' activations, which per-example perturbation ignores (batch norm "
                       "in training mode, centring by the batch mean)")
        for t in _tensors(args, kwargs):
            hit = self.owner.get(id(t))
            if hit is not None and not any(m is hit[1] for m in self.running):
                self._note(f"the parameter {hit[0]} is used by {name} outside its layer's forward (its local rule "
                           "would never see that use)")
            site = self.relu_fed_outputs.get(id(t))
            if site is not None and name.rsplit(".", 1)[-1] in ("relu", "relu_"):
                if out is t:  # an in-place ReLU: the tensor is the ReLU's output from now on
                    del self.relu_fed_outputs[id(t)]
            elif site is not None:
                self._note(f"the output of {site}, which feeds a ReLU, is also used by {name} (a skip path or a "
                           "second consumer): the estimate's ReLU mask would drop that path's gradient")
        return out


def _tensors(args: Sequence[object], kwargs: Dict[str, object]) -> List[Tensor]:
    out: List[Tensor] = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(b for b in a if isinstance(b, Tensor))
    return out


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` without changing it: buffers (batch norm's running statistics) on copies, no gradient."""
    params = dict(model.named_parameters())
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        return torch.func.functional_call(model, (params, buffers), (x,))


def probe(model: nn.Module, layers: Sequence[Tuple[str, nn.Module]], x: Tensor
          ) -> Tuple[List[str], Dict[str, Tuple[int, ...]]]:
    """The layers ``model(x)`` calls, in call order, and each one's output shape per example, from a no-grad pass
    on the first four examples of ``x`` that leaves the model as it was; and the checks of what activity
    perturbation assumes (:class:`ConfigError` naming the layer and the fix when one fails):

    * every layer is called once per forward pass (its local rule uses one input);
    * no parameter is shared by two layers, nor used outside its own layer's forward (``F.linear(h,
      layer.weight)`` elsewhere): a layer's gradient comes from its own input and output alone;
    * a layer whose output goes into a ReLU feeds nothing else (the estimate is masked where the ReLU is off);
    * each example's output depends on that example alone (no batch norm in training mode, no statistics over
      the batch): the perturbation is per example. Checked by changing the first example and comparing the
      others' outputs.
    """
    order: List[str] = []
    shapes: Dict[str, Tuple[int, ...]] = {}
    calls: Dict[str, int] = {}
    owner: Dict[int, Tuple[str, nn.Module]] = {}
    for lname, m in layers:
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in owner and owner[id(p)][1] is not m:
                raise ConfigError(
                    f"activity perturbation: {lname}.{pname} is the same tensor as {owner[id(p)][0]} (a tied "
                    "weight): each layer's local rule would write its own gradient and the second would replace "
                    "the first instead of adding to it. Use gradient=forward or gradient=backprop for this model.")
            owner[id(p)] = (f"{lname}.{pname}", m)
    fed = _relu_fed([model])
    relu_fed_outputs: Dict[int, str] = {}
    alive: List[Tensor] = []
    running: List[nn.Module] = []

    def pre(mod: nn.Module, args: tuple) -> None:
        running.append(mod)

    def seen(name: str, mod: nn.Module, out: Tensor) -> None:
        if name not in shapes:
            order.append(name)
        calls[name] = calls.get(name, 0) + 1
        shapes[name] = tuple(out.shape[1:])
        if id(mod) in fed:
            relu_fed_outputs[id(out)] = name
            alive.append(out)  # held until the pass ends, so that no later tensor reuses its id

    def post(mod: nn.Module, args: tuple, out: object) -> None:
        if running and running[-1] is mod:
            running.pop()

    names = dict(layers)
    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(lambda mod, a, out, name=n: seen(name, mod, out)) for n, m in names.items()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    rows = x[:4]  # (with 2 rows batch norm would give +-1 whatever the first one is: not a test of coupling)
    recorder = _Recorder(owner, running, relu_fed_outputs, rows.shape[0])  # (with 2 rows batch norm would give +-1 whatever the first one is: not a test of coupling)
    replay = SameRandomness([x.device])  # the coupling check's second pass draws the same dropout masks
    try:
        with recorder:
            out = _forward(model, rows)
    finally:
        for h in handles:
            h.remove()
    twice = [n for n, c in calls.items() if c > 1]
    if twice:
        raise ConfigError(
            f"activity perturbation: {', '.join(twice)} is called {calls[twice[0]]} times in one forward pass; its "
            "local rule sees one input, so the gradient of the other calls would be lost. Use a separate layer per "
            "call, or gradient=forward / gradient=backprop for this model.")
    if recorder.problems:
        raise ConfigError(f"activity perturbation cannot estimate this model exactly: {'; '.join(recorder.problems)}."
                          " Use gradient=forward or gradient=backprop for it, or restructure the model.")
    if rows.shape[0] > 1 and isinstance(out, Tensor) and out.shape[:1] == rows.shape[:1]:
        changed = rows.clone()
        changed[0] = changed[0] + 1.0
        # three draws of the model's randomness (each pass of a pair with the same draw): one mask could hide the
        # first example from the second (dropout zeroing its every unit)
        coupled_output = False
        for attempt in range(3):
            if attempt:
                replay = SameRandomness([x.device])
                out = _forward(model, rows)
            replay.restore()
            coupled_output = coupled_output or not torch.equal(_forward(model, changed)[1:], out[1:])
        if coupled_output:
            coupled = [n for n, m in model.named_modules()
                       if isinstance(m, nn.modules.batchnorm._NormBase) and m.training]
            raise ConfigError(
                "activity perturbation perturbs each example's activations on their own and needs each example's "
                "output to depend on that example alone, but this model couples the examples of a batch"
                + (f" (batch norm in training mode: {', '.join(coupled)})" if coupled else
                   " (a statistic over the batch, such as centring by the batch mean)")
                + ". Use gradient=forward or gradient=backprop, or put batch norm in eval mode / use a per-example "
                  "normalisation (LayerNorm, GroupNorm).")
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
    rows (one per unit group and patch, as the block declares: :class:`~fwdgrad.nn.local_losses.LocalBlock`),
    and every head's linear layer exact."""
    names = {id(m): n for n, m in model.named_modules()}
    fed = _relu_fed([blk.body for blk in blocks])
    sites, row = [], 0
    for j, blk in enumerate(blocks):
        body = [m for m in blk.body.modules() if isinstance(m, SITE_TYPES)]
        if blk.answers is None:
            if blk.groups > 1 and len(body) != 1:
                raise ConfigError(
                    f"model.local_groups={blk.groups} needs exactly one linear/conv layer per block (block {j} has "
                    f"{len(body)}): a group's loss must depend on its own units only."
                )
            answers = {id(m): "group" for m in body}
        else:
            answers = {id(m): a for m, a in blk.answers}
            undeclared = [names[id(m)] for m in body if answers.get(id(m)) not in ("group", "patch")]
            if undeclared:
                raise ConfigError(
                    f"block {j} of {type(model).__name__} does not declare which losses the units of "
                    f"{', '.join(undeclared)} answer to ('group' or 'patch' in its LocalBlock's answers)."
                )
        for m in body:
            _check_layer(names[id(m)], m)
            sites.append(Site(names[id(m)], m, relu_after=id(m) in fed, row=row, groups=blk.groups,
                              patches=blk.patches, answers=answers[id(m)]))
        head = head_linear(blk.head)
        sites.append(Site(names[id(head)], head, exact=True, row=row))
        row += blk.rows
    _check_coverage(model, sites)
    return sites


def layer_grads(module: nn.Module, x: Tensor, gz: Tensor) -> Dict[str, Tensor]:
    """The layer's parameter gradients from its input ``x`` and the (estimated) gradient ``gz`` of its output
    (the local rules of the module docstring)."""
    out: Dict[str, Tensor] = {}
    if isinstance(module, NORMED_SITES):
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_(True) for n, p in module.named_parameters(recurse=False)
                      if p.requires_grad}
            z = torch.func.functional_call(module, leaves, (x.detach(),))
            return dict(zip(leaves, torch.autograd.grad(z, list(leaves.values()), gz)))
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
    """Trainable layers of the site types that are not sites: the loss does not depend on them (gradient zero)."""
    used = {id(s.module) for s in sites}
    return [m for _, m in trainable_layers(model) if id(m) not in used]
