"""Local-gradient guesses (Fournier et al. 2023, "Can Forward Gradient Match Backpropagation?", ICML).

A forward gradient needs a *guess* of the step direction; instead of a random tangent, take the gradient of a
local loss: block j's auxiliary loss ``L_j`` (:mod:`fwdgrad.nn.local_losses`), by a cheap backward pass inside the
block (its input detached), ``G_j = grad_{theta_j} L_j``. One forward-mode pass of the **global** loss ``L``
(the output layer's loss through the whole network, nothing detached) along the guesses then projects the
true gradient onto them:

    g_j = <grad_{theta_j} L, G_j> G_j / |G_j|^2                 (scope="block": per block, as in the paper)
    g   = <grad L, G> G / |G|^2,  G = (G_1, ..., G_N)           (scope="global": over all those parameters)

Per block, the k = N - 1 guesses (one per block but the last) are block-sparse tangents, so the per-block
formula is exactly the projection of ``grad L`` onto their span (:mod:`~fwdgrad.estimators.aggregation`'s
``projection``; a zero guess gets coefficient 0). The last block's local loss *is* the global loss restricted
to it, so its guess is already the true gradient and is used as is; the auxiliary heads, which the global loss
does not depend on, are trained by their own local gradient (as in the paper's code).

No backward pass crosses a block boundary. The cost is a local backward over every block plus one forward-mode
pass with N - 1 tangents (scope="global": one).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.func import functional_call

from fwdgrad.errors import ConfigError
from fwdgrad.estimators.aggregation import aggregate
from fwdgrad.estimators.backends import BackendDispatch
from fwdgrad.estimators.base import (
    Backprop,
    GradientEstimator,
    LossFn,
    OutputLoss,
    Params,
    mean_loss,
    write_grads,
)
from fwdgrad.estimators.local import LocalObjective
from fwdgrad.estimators.memory_policy import TangentMemoryPolicy
from fwdgrad.nn.local_losses import LocalBlock, local_blocks, require_detached

__all__ = ["LocalGuess", "GUESS_SCOPES"]

GUESS_SCOPES = ("block", "global")


class LocalGuess(GradientEstimator):
    """Forward gradient along local-gradient guesses (module docstring); needs ``model.local_losses=true``.

    Args:
        scope: ``block`` (one projection per block, the paper's) or ``global`` (one over all parameters).
        backend: ``auto`` | ``fast`` | ``func`` for the forward-mode pass (:mod:`~fwdgrad.estimators.backends`).
    """

    def __init__(self, scope: str = "block", backend: str = "auto") -> None:
        if scope not in GUESS_SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(GUESS_SCOPES)}, got {scope!r}.")
        self.scope = scope
        self.dispatch = BackendDispatch(backend)
        self._backprop = Backprop()
        self._memory: Optional[TangentMemoryPolicy] = None

    def compute(self, loss_fn: LossFn, params: Params) -> Tuple[Tensor, Params]:
        raise ConfigError(
            "gradient=forward_guess takes its guesses from the model's blocks and their auxiliary losses, so it "
            "needs the model: use it through fwdgrad.estimate_module_grads (as the training loop does) with "
            "model.local_losses=true."
        )

    def describe(self) -> Dict[str, object]:
        out: Dict[str, object] = {"estimator": type(self).__name__, "scope": self.scope}
        out.update(self.dispatch.describe())
        return out

    def state_dict(self) -> Dict[str, object]:
        """Nothing random; what changes the rounding of the next estimates: the measured pass size (how the
        guesses are grouped into passes) and a fallback to torch.func."""
        memory = self._memory
        return {"memory": None if memory is None else (memory.num_tangents, memory.bytes_per_tangent),
                "fallback_reason": self.dispatch.fallback_reason}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        memory = state.get("memory")
        if memory is not None:
            k, bytes_per_tangent = memory  # type: ignore[misc]
            self._memory = TangentMemoryPolicy(int(k), False, bytes_per_tangent=bytes_per_tangent)
        self.dispatch.fallback_reason = state.get("fallback_reason")  # type: ignore[assignment]

    def estimate_module(self, model: nn.Module, loss_of_output: OutputLoss, inputs: Tuple[Tensor, ...]) -> Tensor:
        """Write the projected gradients (and the heads' local gradients) into ``.grad``; returns the loss."""
        blocks = local_blocks(model)
        if blocks is None:
            raise ConfigError(
                "gradient=forward_guess needs guesses from local losses: set model.local_losses=true."
            )
        require_detached(blocks, "gradient=forward_guess")
        loss, grads = self._guesses(model, blocks, loss_of_output, inputs)
        groups = projected_groups(model, blocks, self.scope)
        if groups:
            grads.update(self._project(model, loss_of_output, inputs, grads, groups))
        write_grads(model, grads)
        return loss

    def _guesses(self, model: nn.Module, blocks: Sequence[LocalBlock], loss_of_output: OutputLoss,
                 inputs: Tuple[Tensor, ...]) -> Tuple[Tensor, Dict[str, Tensor]]:
        """The output layer's loss and every block's local gradient, by one backward pass through the detached
        blocks (:class:`~fwdgrad.estimators.local.LocalObjective`), keyed like ``model.named_parameters()``."""
        wrapper = LocalObjective(model, blocks, loss_of_output)
        params = {n: p.detach() for n, p in wrapper.named_parameters() if p.requires_grad}
        loss, grads = self._backprop(lambda p: functional_call(wrapper, p, inputs), params)
        return loss, {n[len("model."):]: g for n, g in grads.items()}

    def _project(self, model: nn.Module, loss_of_output: OutputLoss, inputs: Tuple[Tensor, ...],
                 guesses: Dict[str, Tensor], groups: Sequence[Sequence[str]]) -> Dict[str, Tensor]:
        """The global loss's gradient projected onto the guesses, one forward-mode pass with k = len(groups)."""
        tangents = _guess_tangents(guesses, groups)
        params = {n: p.detach() for n, p in model.named_parameters() if n in tangents}

        def global_loss(p: Dict[str, Tensor]) -> Tensor:
            return mean_loss(loss_of_output(functional_call(model, p, inputs)))

        k = len(groups)
        if self._memory is None or self._memory.num_tangents != k:
            self._memory = TangentMemoryPolicy(k, False)  # carries the pass size between calls (regeneration.py)
        _, d = self.dispatch(global_loss, params, tangents, k, self._memory)
        return aggregate("projection", tangents, d)


def projected_groups(model: nn.Module, blocks: Sequence[LocalBlock], scope: str) -> List[List[str]]:
    """The parameter names of each guess: block by block (the bodies of all blocks but the last), or one group
    of every body and the output layer (``global``)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    bodies = [[names[id(p)] for p in blk.body.parameters() if id(p) in names] for blk in blocks]
    if scope == "block":
        return [b for b in bodies[:-1] if b]
    last_head = [names[id(p)] for p in blocks[-1].head.parameters() if id(p) in names]
    return [[n for b in bodies for n in b] + last_head]


def _guess_tangents(guesses: Dict[str, Tensor], groups: Sequence[Sequence[str]]) -> Dict[str, Tensor]:
    """Tangent i is guess i on its own group's parameters and zero elsewhere: ``(k, *shape)`` per parameter."""
    out = {}
    for i, group in enumerate(groups):
        for name in group:
            g = guesses[name]
            t = g.new_zeros((len(groups), *g.shape))
            t[i] = g
            out[name] = t
    return out
