"""How close do whole estimators come to the true gradient of a real model? (``approx_quality.py``, model sources)

:mod:`fwdgrad.experiments.quality.analysis` measures weight-perturbed forward gradients on a gradient alone (a linear loss has the
same directional derivatives). Activity perturbation, local losses and local-gradient guesses need the model,
its data and its loss, so a source may also return a :class:`ModelProblem` (``source=mnist_mlp`` does: the
MLP at each recorded point of training, with auxiliary heads fitted to its features, and the probe batch).

For every problem and every configured *method* (an estimator config and whether the model uses its local
losses), ``num_samples`` estimates ``g`` are drawn through :func:`~fwdgrad.estimators.estimate_module_grads`,
exactly as training computes them, and compared by cosine similarity with

* the **global** target: backprop's gradient of the output layer's loss, over the network's own parameters
  (the auxiliary heads, on which it does not depend, left out);
* the **local** target, for methods that follow local losses: every block's own local-loss gradient (LG-BP),
  over every parameter. LG-FG-W and LG-FG-A estimate it; guesses aim at the global target from it.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from fwdgrad.app.config import build
from fwdgrad.errors import ConfigError
from fwdgrad.estimators import Backprop, GradientEstimator, estimate_module_grads
from fwdgrad.nn.functional import per_example_cross_entropy
from fwdgrad.nn.local_losses import check_groups, head_linear, local_blocks

__all__ = ["ModelProblem", "Method", "read_methods", "model_problems", "method_quality_table"]

log = logging.getLogger(__name__)
AUX = "aux_heads."  # parameters of the auxiliary heads (fwdgrad.nn.models)


@dataclass
class ModelProblem:
    """A model (with auxiliary heads, ``local_losses`` switched per method) and the batch its gradient is on."""

    model: nn.Module
    x: Tensor
    y: Tensor


@dataclass
class Method:
    """One estimator to compare: its config node, and whether (and with how many unit groups) the model
    follows its local losses."""

    label: str
    estimator: Any
    local_losses: bool = False
    local_groups: int = 1


def read_methods(node: Mapping[str, Any]) -> List[Method]:
    """``methods`` from the config: ``label: {estimator: {_target_: ...}, local_losses: bool, local_groups: int}``."""
    out = []
    for label, spec in node.items():
        if "estimator" not in spec:
            raise ConfigError(f"methods.{label} needs an `estimator` node (with a _target_), got keys {list(spec)}.")
        out.append(Method(str(label), spec["estimator"], bool(spec.get("local_losses", False)),
                          int(spec.get("local_groups", 1))))
    return out


def model_problems(source: Iterable[Any]) -> List[Tuple[str, ModelProblem]]:
    """The ``(name, ModelProblem)`` of every source item that has one (items ``(name, grad, problem)``)."""
    return [(item[0], item[2]) for item in source if isinstance(item, (tuple, list)) and len(item) == 3
            and isinstance(item[2], ModelProblem)]


def _grads(model: nn.Module, est: GradientEstimator, p: ModelProblem) -> Dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    estimate_module_grads(est, model, lambda out: per_example_cross_entropy(out, p.y), p.x)
    return {n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None}


def _cosine(a: Mapping[str, Tensor], b: Mapping[str, Tensor], names: Sequence[str]) -> Tuple[float, float]:
    """Cosine similarity and norm ratio ``|a| / |b|`` over the parameters ``names`` (float64)."""
    dot = sum(float((a[n].double() * b[n].double()).sum()) for n in names)
    na = math.sqrt(sum(float(a[n].double().pow(2).sum()) for n in names))
    nb = math.sqrt(sum(float(b[n].double().pow(2).sum()) for n in names))
    return (dot / (na * nb) if na > 0 and nb > 0 else float("nan")), (na / nb if nb > 0 else float("nan"))


def _configure(model: nn.Module, method: Method) -> nn.Module:
    """The problem's model set up for ``method`` (a copy: local_losses and groups are switched on it)."""
    model = copy.deepcopy(model)
    model.local_losses = method.local_losses
    if method.local_losses:
        if not hasattr(model, "aux_heads"):
            raise ConfigError(f"methods.{method.label}: the source's model has no auxiliary heads.")
        widths = [head_linear(b.head).in_features for b in local_blocks(model)]
        model.local_groups = check_groups(method.local_groups, widths)
    return model


def _sample(problem: ModelProblem, method: Method, num_samples: int, targets: Dict[str, Dict[str, Tensor]]
            ) -> Dict[str, np.ndarray]:
    model = _configure(problem.model, method)
    est = build(method.estimator, f"methods.{method.label}.estimator", expected=GradientEstimator)
    network = [n for n in targets["global"] if not n.startswith(AUX)]
    out = {key: np.full(num_samples, np.nan) for key in ("cos_global", "ratio_global", "cos_local")}
    for m in range(num_samples):
        g = _grads(model, est, problem)
        g = {n: g.get(n, torch.zeros_like(t)) for n, t in targets["local"].items()}
        out["cos_global"][m], out["ratio_global"][m] = _cosine(g, targets["global"], network)
        if method.local_losses:
            out["cos_local"][m] = _cosine(g, targets["local"], list(targets["local"]))[0]
    return out


def _targets(problem: ModelProblem) -> Dict[str, Dict[str, Tensor]]:
    plain, local = (_configure(problem.model, Method("target", None, flag)) for flag in (False, True))
    glob = _grads(plain, Backprop(), problem)
    return {"global": {n: glob[n] for n in glob if not n.startswith(AUX)}, "local": _grads(local, Backprop(), problem)}


def method_quality_table(problems: Sequence[Tuple[str, ModelProblem]], methods: Sequence[Method],
                         num_samples: int) -> pd.DataFrame:
    """One row per (problem, method): mean/std of the cosine to the global and the local target, and the mean
    norm ratio to the global one (NaN where a target does not apply)."""
    rows = []
    for name, problem in problems:
        targets = _targets(problem)
        for method in methods:
            s = _sample(problem, method, num_samples, targets)
            log.info("%s / %s: cos to global %.4f, to local %.4f", name, method.label,
                     float(np.mean(s["cos_global"])), float(np.mean(s["cos_local"])))
            rows.append({"source": name, "method": method.label, "local_losses": method.local_losses,
                         "samples": num_samples,
                         "cos_global_mean": float(np.mean(s["cos_global"])),
                         "cos_global_std": float(np.std(s["cos_global"], ddof=1)) if num_samples > 1 else 0.0,
                         "cos_local_mean": float(np.mean(s["cos_local"])),
                         "cos_local_std": float(np.std(s["cos_local"], ddof=1)) if num_samples > 1 else 0.0,
                         "ratio_global_mean": float(np.mean(s["ratio_global"]))})
    return pd.DataFrame(rows)
