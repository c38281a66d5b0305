"""How good is a forward gradient? Cosine similarity and norm ratio against the true gradient.

For a fixed "true" gradient ``a`` (dimension n) we draw many forward-gradient estimates ``g`` with the project's
own :class:`~fwdgrad.ForwardGradient` and record

* the cosine similarity ``cos(g, a) = <g, a> / (|g| |a|)`` (the direction: what an optimizer step follows), and
* the norm ratio ``|g| / |a|`` (the step length it implies),

for every number of tangents k, aggregation and tangent distribution.

The estimator sees the linear loss ``f(p) = <a, p>``, whose gradient is ``a`` everywhere, so each directional
derivative ``jvp`` returns ``<a, v>`` exactly. A forward gradient depends on the loss only through these
directional derivatives, so the estimates are the same (up to rounding) as those for any loss whose gradient
at the evaluation point is ``a``: the gradient of the MLP's MNIST loss, say, costs one backward pass to obtain
and nothing more afterwards.

Theory for Gaussian tangents (every distribution of ``B`` below is rotation invariant, so WLOG ``a = e_1``):

* projection onto ``span(B)``, ``B`` an ``n x k`` Gaussian matrix: the span is a uniformly random k-dimensional
  subspace, so ``cos^2`` is the squared length of a uniform unit vector's projection onto k coordinates,
  ``cos^2 ~ Beta(k/2, (n-k)/2)``: ``E[cos^2] = k/n`` and ``E[cos] ~ sqrt(k/n)`` (exactly 1 at k = n).
  ``|g| = |a| cos`` since ``g`` is an orthogonal projection of ``a``.
* mean (and sum, which is the same direction k times longer): ``g = (1/k) B u`` with ``u = B^T a``, the first
  row of ``B``. Then ``g_1 = |u|^2`` and, given ``u``, ``g_j = <b_j, u> ~ N(0, |u|^2)`` independently for
  ``j >= 2``, so with ``Q = |u|^2 ~ chi2_k`` and ``X ~ chi2_{n-1}`` independent,
  ``cos^2 = Q / (Q + X) ~ Beta(k/2, (n-1)/2)``: ``E[cos^2] = k/(n+k-1)``, the projection's law in dimension
  ``n + k - 1``. It approaches 1 only as k grows far beyond n.
  ``E[|g|^2] / |a|^2 = (n + k + 1) / k`` (``E[d^2 |v|^2] = (n+2)|a|^2`` for one tangent, cross terms ``|a|^2``).

For ``cos^2 ~ Beta(alpha, beta)``: ``E[cos] = E[sqrt(cos^2)] = B(alpha + 1/2, beta) / B(alpha, beta)`` and
``Var[cos^2] = alpha beta / ((alpha+beta)^2 (alpha+beta+1))``; the tests derive their tolerances from these.

Zeroth order beside it: with a :class:`~fwdgrad.ZerothOrder` estimator (the config's ``zeroth_order`` node), every
draw also gets the finite-difference directional derivatives on the *same* tangents, aggregated by the same rules:
columns ``zo_cos_*`` (its cosine to the true gradient) and ``zo_fg_cos_*`` (its cosine to the forward gradient of
that draw). The two differ only by the finite-difference error of each ``d_i``; on this linear loss the truncation
term vanishes (the third derivative is 0), so what remains is float rounding, about ``u |f| / eps`` per derivative.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch import Tensor

from fwdgrad.app.config import build, threads
from fwdgrad.experiments.plots import plot_cosine_vs_angle, plot_cosine_vs_k, plot_method_cosines, plot_norm_ratio_vs_k
from fwdgrad.experiments.quality.theory import (
    SPLITTING_AGGREGATIONS,
    cos2_beta_parameters,
    cos2_variance,
    expected_cos2,
    expected_cosine,
    expected_norm_ratio_sq,
)
from fwdgrad.errors import ConfigError
from fwdgrad.engine import Regenerated
from fwdgrad.estimators import (
    AGGREGATIONS,
    TANGENT_DISTRIBUTIONS,
    Backprop,
    DirectionalEstimator,
    LossFn,
    Params,
    TangentDistribution,
    ZerothOrder,
    aggregate,
    check_seed,
    estimate_module_grads,
)
from fwdgrad.nn.functional import cross_entropy
from fwdgrad.experiments.quality.method_quality import ModelProblem, method_quality_table, model_problems, read_methods
from fwdgrad.app.rundir import claim_output_dir
from fwdgrad.app.schema import ApproxQualityConfig, validate_config

__all__ = [
    "GradientSource",
    "QualitySamples",
    "gaussian_gradients",
    "linear_loss",
    "flatten_params",
    "mlp_gradients",
    "cos2_beta_parameters",
    "expected_cosine",
    "expected_cos2",
    "cos2_variance",
    "expected_norm_ratio_sq",
    "sample_quality",
    "approx_quality_table",
    "run_approx_quality",
]

log = logging.getLogger(__name__)

#: What a source factory returns: ``(name, true gradient)`` pairs, the gradient a Tensor or a dict of Tensors
#: shaped like a model's parameters (structured tangents, e.g. for weight matrices, see those shapes); an item
#: may carry a third element, a :class:`~fwdgrad.experiments.quality.method_quality.ModelProblem` (the model and batch the gradient
#: is of), on which whole estimators are compared (``methods`` in the config).
GradientSource = list[tuple]
#: A tangent distribution: a registered name, or an object (a distribution with settings, e.g. FixedAngle(30)).
Distribution = str | TangentDistribution
#: ``make_estimator(num_tangents, aggregation, distribution) -> estimator`` (a DirectionalEstimator: forward gradient
#: or zeroth order)
EstimatorFactory = Callable[[int, str, Distribution], DirectionalEstimator]

QUANTILES = (0.05, 0.5, 0.95)


# -- sources ----------------------------------------------------------------------------------------------
def gaussian_gradients(dims: Sequence[int], seed: int = 0, dtype: str = "float32") -> GradientSource:
    """Random "true gradients" ``a ~ N(0, I_n)``, one flat vector per ``n`` in ``dims``.

    The vectors are drawn from a generator seeded with ``(seed, n)`` mixed by ``numpy.random.SeedSequence``,
    never with ``seed`` itself: the estimator's generator *is* seeded with ``seed``, and a tangent equal to the
    gradient would report a cosine of 1.
    """
    torch_dtype = getattr(torch, str(dtype), None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ConfigError(
            f"source.dtype must name a torch floating-point dtype (float32, float64), got {dtype!r}."
        )
    out: GradientSource = []
    for n in dims:
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"source.dims must be positive integers (vector dimensions), got {n!r}.")
        state = np.random.SeedSequence([int(seed), int(n)]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(state))
        out.append((f"gaussian n={n}", torch.randn(n, generator=gen, dtype=torch.float64).to(torch_dtype)))
    return out


def mlp_gradients(
    dataset: Any,
    hidden_sizes: Sequence[int] = (1024, 1024),
    train_steps: Sequence[int] = (0, 200),
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> GradientSource:
    """The real gradient of an MLP's mean cross-entropy on one training batch, at several points of training.

    ``dataset`` is a :class:`fwdgrad.experiments.data.Splits` (instantiated from the source config's ``dataset`` node; its
    ``batch_size`` is the batch the gradient is taken on). The MLP is initialised from ``seed + 1`` (not ``seed``:
    the estimator's tangent stream is seeded with ``seed``), trained with backprop and Adam, and its exact gradient
    (as a dict shaped like the parameters, so structured tangents apply) is recorded after each number of steps in
    ``train_steps`` (0 = at initialisation).

    Each item also carries a :class:`~fwdgrad.experiments.quality.method_quality.ModelProblem` (the model at that point and the probe
    batch). The model has auxiliary heads (``local_losses``, off while the network trains on the global loss),
    fitted alongside on the detached features, so that local losses are meaningful at every point; the network
    and its gradients are those of the plain MLP (the heads are created after it and never touch it).
    """
    from fwdgrad.experiments.data import iterate_batches
    from fwdgrad.nn.models import MLP

    steps = sorted(int(t) for t in train_steps)
    if not steps or steps[0] < 0:
        raise ConfigError(f"source.train_steps must be non-negative step counts, got {list(train_steps)}.")
    torch.manual_seed(int(seed) + 1)
    model = MLP(dataset.input_shape, dataset.num_classes, tuple(hidden_sizes), local_losses=True)
    opt = torch.optim.Adam(model.parameters(), lr=float(learning_rate))
    gen = torch.Generator().manual_seed(int(seed) + 1)
    x_probe, y_probe = dataset.train_x[: dataset.batch_size], dataset.train_y[: dataset.batch_size]
    out: GradientSource = []
    done = 0
    batches = iter(())
    for target in steps:
        while done < target:
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(iterate_batches(dataset.train_x, dataset.train_y, dataset.batch_size, gen))
                continue
            _global_and_head_step(model, opt, x, y)
            done += 1
        params = {n: p.detach() for n, p in model.named_parameters() if not n.startswith("aux_heads.")}
        _, grad = Backprop()(lambda p: cross_entropy(torch.func.functional_call(model, p, (x_probe,)), y_probe), params)
        label = "init" if target == 0 else f"after {target} steps"
        out.append((f"MLP {dataset.name} {label} (n={sum(g.numel() for g in grad.values())})", grad,
                    ModelProblem(copy.deepcopy(model), x_probe, y_probe)))
    return out


def _global_and_head_step(model: Any, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """One Adam step: the network on the global loss (backprop), the auxiliary heads on their local losses
    (whose gradients reach only the heads' own parameters there: the blocks' features are taken as given)."""
    opt.zero_grad(set_to_none=True)
    model.local_losses = False
    estimate_module_grads(Backprop(), model, lambda o: cross_entropy(o, y), x)
    network = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    model.local_losses = True
    estimate_module_grads(Backprop(), model, lambda o: cross_entropy(o, y), x)
    for n, p in model.named_parameters():
        p.grad = network.get(n, p.grad) if not n.startswith("aux_heads.") else p.grad
    opt.step()


def normalise_source(source: Any) -> GradientSource:
    """Accept a list of ``(name, params)`` pairs or a ``{name: params}`` mapping from a source factory."""
    items: Iterable[Any] = source.items() if isinstance(source, Mapping) else source
    out: GradientSource = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) in (2, 3) and isinstance(item[0], str)):
            raise ConfigError(
                "a gradient source must return (name, gradient) pairs (or (name, gradient, ModelProblem)) or a "
                f"{{name: gradient}} mapping, got an element of type {type(item).__name__}; fix the factory "
                "named by source._target_."
            )
        out.append((item[0], item[1]))
    if not out:
        raise ConfigError("the gradient source returned no gradients; check the source config.")
    return out


# -- the loss and flattening ---------------------------------------------------------------------------------
def _as_dict(p: Params) -> dict[str, Tensor]:
    return {"": p} if isinstance(p, Tensor) else dict(p)


def flatten_params(p: Params) -> Tensor:
    """Concatenate a Tensor or a dict of Tensors into one flat vector (dict order)."""
    return torch.cat([t.reshape(-1) for t in _as_dict(p).values()])


def linear_loss(grad: Params) -> LossFn:
    """``f(p) = <grad, p>`` summed over all tensors: its gradient is ``grad`` exactly, at every ``p``."""
    single = isinstance(grad, Tensor)
    g = _as_dict(grad)

    def loss(p: Params) -> Tensor:
        pd_ = {"": p} if single else p
        return sum((g[name] * pd_[name]).sum() for name in g)

    return loss


# -- sampling ----------------------------------------------------------------------------------------------------
@dataclass
class QualitySamples:
    """Per-draw cosine similarities and norm ratios ``|g|/|a|`` (arrays of length M); with a zeroth-order
    estimator also its cosine to the true gradient and to the forward gradient ``g`` of the same draw."""

    cosine: np.ndarray
    norm_ratio: np.ndarray
    zo_cosine: np.ndarray | None = None
    zo_fg_cosine: np.ndarray | None = None


def _cos(g: Tensor, a: Tensor, a_norm: float) -> float:
    g_norm = float(g.norm())
    return float(g @ a) / (g_norm * a_norm) if g_norm > 0 and a_norm > 0 else 0.0


def sample_quality(
    make_estimator: EstimatorFactory,
    grad: Params,
    num_tangents: int,
    distribution: Distribution,
    aggregations: Sequence[str],
    num_samples: int,
    zeroth_order: ZerothOrder | None = None,
) -> dict[str, QualitySamples]:
    """Draw ``num_samples`` estimates of ``grad`` per aggregation, with common tangents across aggregations.

    One estimator (built for the first aggregation) draws the tangents and computes the directional
    derivatives with its own stages (``draw`` and ``directional_derivatives``, exactly what
    ``est(loss_fn, params)`` runs); every aggregation's rule (:data:`~fwdgrad.estimators.AGGREGATIONS`) is then
    applied to the same tangents and derivatives. The result equals calling an estimator per aggregation
    with the same seed ``num_samples`` times (a test checks this), at a fraction of the cost, and the
    comparison between aggregations is a paired one. ``zeroth_order`` (built with the same k), if given, adds
    finite-difference estimates on the same tangents (module docstring).
    """
    if not aggregations:
        return {}
    rules = {agg: AGGREGATIONS.lookup(agg) for agg in aggregations}
    sampler = make_estimator(num_tangents, aggregations[0], distribution)
    loss_fn = linear_loss(grad)
    single = isinstance(grad, Tensor)
    params = {name: torch.zeros_like(t) for name, t in _as_dict(grad).items()}
    a = flatten_params(grad).double()
    a_norm = float(a.norm())
    if a_norm == 0:
        raise ConfigError("the true gradient is zero: cosine similarity is undefined; check the source.")
    cos, ratio, zo_cos, zo_fg = ({agg: np.empty(num_samples) for agg in aggregations} for _ in range(4))
    n = int(a.numel())
    for m in range(num_samples):
        tangents = sampler.draw(params).tangents
        _, d = sampler.directional_derivatives(loss_fn, params, tangents, single)
        d_zo = None
        if zeroth_order is not None:  # regenerated tangents materialised once: the passes read them 2k times
            dense = {name: (t.dense() if isinstance(t, Regenerated) else t) for name, t in tangents.items()}
            d_zo = zeroth_order.directional_derivatives(loss_fn, params, dense, single)[1]
        for agg, rule in rules.items():
            g = flatten_params(aggregate(rule, tangents, d, n)).double()
            cos[agg][m], ratio[agg][m] = _cos(g, a, a_norm), float(g.norm()) / a_norm
            if d_zo is not None:
                g_zo = flatten_params(aggregate(rule, tangents, d_zo, n)).double()
                zo_cos[agg][m], zo_fg[agg][m] = _cos(g_zo, a, a_norm), _cos(g_zo, g, float(g.norm()))
    with_zo = zeroth_order is not None
    return {agg: QualitySamples(cos[agg], ratio[agg], zo_cos[agg] if with_zo else None,
                                zo_fg[agg] if with_zo else None) for agg in aggregations}


def _summary(prefix: str, x: np.ndarray) -> dict[str, float]:
    q = np.quantile(x, QUANTILES)
    out = {f"{prefix}_mean": float(x.mean()), f"{prefix}_std": float(x.std(ddof=1)) if x.size > 1 else 0.0}
    out.update({f"{prefix}_q{int(round(p * 100)):02d}": float(v) for p, v in zip(QUANTILES, q)})
    return out


def distribution_options(dist: Distribution) -> dict[str, float]:
    """A distribution's settings (``{"angle": 30.0}`` for angle tangents; ``{}`` for most), by name or object."""
    obj = TANGENT_DISTRIBUTIONS.lookup(dist) if isinstance(dist, str) else dist
    options = getattr(obj, "options", None)
    return dict(options()) if callable(options) else {}


def approx_quality_table(
    source: GradientSource,
    make_estimator: EstimatorFactory,
    num_tangents: Sequence[int],
    aggregations: Sequence[str],
    distributions: Sequence[Distribution],
    num_samples: int,
    make_zeroth_order: Callable[[int], ZerothOrder] | None = None,
) -> pd.DataFrame:
    """One row per (source gradient, distribution, aggregation, k): cosine and norm-ratio statistics.

    Projection is skipped where k > n (k = n is already exact). A tangent distribution that does not apply to
    a source (the estimator raises ``ValueError``, e.g. structured tangents on a flat vector) is skipped for
    that source with a warning. The ``*_gaussian`` columns are the exact expectations for Gaussian tangents.
    ``make_zeroth_order(k)``, if given, adds the ``zo_cos_*`` and ``zo_fg_cos_*`` columns (:func:`sample_quality`).
    A distribution's settings (e.g. ``angle``) are columns of their own (empty for the others).
    """
    rows: list[dict[str, Any]] = []
    for name, grad in source:
        n = int(flatten_params(grad).numel())
        for dist in distributions:
            for k in num_tangents:
                aggs = [a for a in aggregations if not (a == "projection" and k > n)]
                try:
                    zo = make_zeroth_order(k) if make_zeroth_order is not None else None
                    samples = sample_quality(make_estimator, grad, k, dist, aggs, num_samples, zo)
                except ValueError as e:
                    if isinstance(e, ConfigError):
                        raise
                    log.warning("%s: skipping tangent distribution %r (%s)", name, dist, e)
                    break
                for agg, s in samples.items():
                    row: dict[str, Any] = {
                        "source": name, "n": n, "distribution": str(dist), "aggregation": agg, "k": k,
                        "samples": num_samples, **distribution_options(dist),
                    }
                    row.update(_summary("cos", s.cosine))
                    row.update(_summary("ratio", s.norm_ratio))
                    if s.zo_cosine is not None and s.zo_fg_cosine is not None:
                        row.update(_summary("zo_cos", s.zo_cosine))
                        row.update(_summary("zo_fg_cos", s.zo_fg_cosine))
                        row["zo_fg_cos_min"] = float(s.zo_fg_cosine.min())
                    try:
                        row["cos_expected_gaussian"] = expected_cosine(agg, n, k)
                        row["ratio_rms_expected_gaussian"] = math.sqrt(expected_norm_ratio_sq(agg, n, k))
                    except ValueError:
                        row["cos_expected_gaussian"] = row["ratio_rms_expected_gaussian"] = float("nan")
                    rows.append(row)
    return pd.DataFrame(rows)


# -- the experiment -----------------------------------------------------------------------------------------
def _estimator_factory(gradient_cfg: DictConfig) -> EstimatorFactory:
    """Build estimators from the ``gradient`` config group, overriding k, aggregation and distribution."""

    def make(num_tangents: int, aggregation: str, distribution: Distribution) -> DirectionalEstimator:
        try:
            est = build(gradient_cfg, "gradient", num_tangents=int(num_tangents), aggregation=aggregation,
                        distribution=distribution)
        except ConfigError as e:
            raise ConfigError(
                f"could not build the estimator from the `gradient` config with num_tangents={num_tangents}, "
                f"aggregation={aggregation!r}, distribution={distribution!r}: {e}. The analysis needs a "
                "directional estimator (gradient=forward or gradient=zeroth_order) and aggregations/distributions "
                "it accepts."
            ) from None
        if not isinstance(est, DirectionalEstimator):
            raise ConfigError(
                f"the `gradient` config built a {type(est).__name__}, but the analysis draws tangents and "
                "directional derivatives: use gradient=forward or gradient=zeroth_order."
            )
        return est

    return make


def _zeroth_order_factory(node: DictConfig | None) -> Callable[[int], ZerothOrder] | None:
    """``k -> ZerothOrder`` from the config's ``zeroth_order`` node (None when the node is absent or null); only
    its directional derivatives are used, so it skips the pass for the exact loss."""
    if node is None:
        return None

    def make(num_tangents: int) -> ZerothOrder:
        return build(node, "zeroth_order", expected=ZerothOrder, num_tangents=int(num_tangents), exact_loss=False)

    return make


def _log_table(df: pd.DataFrame) -> None:
    """Log mean cosine per (source, k) and (distribution, aggregation), next to the Gaussian expectation."""
    table = df.pivot_table(index=["source", "k"], columns=["distribution", "aggregation"], values="cos_mean",
                           sort=False)
    table.columns = [f"{d}/{a}" for d, a in table.columns]
    if "projection" in set(df["aggregation"]):
        exp = df[df["aggregation"] == "projection"].drop_duplicates(["source", "k"])
        table["E[cos] proj"] = exp.set_index(["source", "k"])["cos_expected_gaussian"]
    exp = df[df["aggregation"].isin(SPLITTING_AGGREGATIONS)].drop_duplicates(["source", "k"])
    if len(exp):
        table["E[cos] mean"] = exp.set_index(["source", "k"])["cos_expected_gaussian"]
    log.info("mean cosine similarity to the true gradient (E[...]: exact, Gaussian tangents):\n%s",
             table.to_string(float_format=lambda v: f"{v:.4f}", na_rep="-"))


def _distribution(node: Any, i: int) -> Distribution:
    """An entry of ``distributions``: a registered name, or a node with ``_target_`` (e.g. FixedAngle)."""
    if isinstance(node, str):
        return node
    return build(node, f"distributions[{i}]", expected=TangentDistribution)


def run_approx_quality(cfg: DictConfig, output_dir: Path | None = None) -> dict[str, float]:
    """Run the approximation-quality experiment of ``configs/approx_quality.yaml``.

    Writes ``approx_quality.csv``, ``cosine_vs_k.png`` and ``norm_ratio_vs_k.png`` into ``output_dir``
    (default: Hydra's run directory), and ``cosine_vs_angle.png`` when some tangents have an ``angle`` (frog's
    Sec. 4.3: ``+experiment=frog_quality/angles``), and returns the mean cosine of every row, keyed
    ``cos/<source>/<distribution>/<aggregation>/k=<k>``.
    """
    validate_config(cfg, ApproxQualityConfig, "approx_quality.py")
    check_seed(cfg.get("seed", 0))
    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ConfigError("no output directory: pass output_dir=... or run through approx_quality.py (Hydra "
                              "sets its run directory).")
        output_dir = Path(HydraConfig.get().runtime.output_dir)
    output_dir = Path(output_dir)
    claim_output_dir(output_dir, bool(cfg.get("overwrite", False)))
    ks = [int(k) for k in cfg.num_tangents]
    if not ks or min(ks) < 1:
        raise ConfigError(f"num_tangents must be a non-empty list of integers >= 1, got {ks}.")
    if int(cfg.num_samples) < 2:
        raise ConfigError(f"num_samples must be >= 2 (spread needs two draws), got {cfg.num_samples}.")
    aggregations = list(cfg.aggregations)
    distributions = [_distribution(node, i) for i, node in enumerate(cfg.distributions)]
    make = _estimator_factory(cfg.gradient)
    make_zo = _zeroth_order_factory(cfg.get("zeroth_order"))
    for agg in aggregations:  # fail fast on a typo, before any work
        for dist in distributions:
            make(1, agg, dist)
    if make_zo is not None:
        make_zo(1)
    raw = build(cfg.source, "source")
    source = normalise_source(raw)
    log.info("sources: %s; k in %s; %d draws each", ", ".join(n for n, _ in source), ks, cfg.num_samples)

    with threads(cfg.get("num_threads") or None, "num_threads"):
        df = approx_quality_table(source, make, ks, aggregations, distributions, int(cfg.num_samples), make_zo)
    if df.empty:
        raise ConfigError("no combination of source, distribution and aggregation could be measured.")

    output_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(output_dir / "approx_quality.csv", index=False)
    files = ["approx_quality.csv", "cosine_vs_k.png", "norm_ratio_vs_k.png"]
    plot_cosine_vs_k(df, output_dir / files[1])
    plot_norm_ratio_vs_k(df, output_dir / files[2])
    if "angle" in df and df["angle"].notna().any():
        files.append("cosine_vs_angle.png")
        plot_cosine_vs_angle(df, output_dir / files[-1])
    _log_table(df)
    log.info("wrote %s", ", ".join(str(output_dir / f) for f in files))
    metrics = {
        f"cos/{r.source}/{r.distribution}/{r.aggregation}/k={r.k}": float(r.cos_mean)
        for r in df.itertuples(index=False)
    }
    return {**metrics, **_compare_methods(cfg, model_problems(raw), output_dir)}


def _compare_methods(cfg: DictConfig, problems: list, output_dir: Path) -> dict[str, float]:
    """Whole estimators on the source's model problems (:mod:`fwdgrad.experiments.quality.method_quality`): methods.csv and
    methods.png, when the source has problems and the config lists ``methods``."""
    methods = read_methods(cfg.get("methods") or {})
    if not methods or not problems:
        if methods:
            log.info("the source has no model problems (use source=mnist_mlp): methods not compared")
        return {}

    with threads(cfg.get("num_threads") or None, "num_threads"):
        mdf = method_quality_table(problems, methods, int(cfg.get("method_samples", 20)))
    mdf.to_csv(output_dir / "methods.csv", index=False)
    plot_method_cosines(mdf, output_dir / "methods.png")
    log.info("cosine similarity of each method to the global / local gradient:\n%s",
             mdf[["source", "method", "cos_global_mean", "cos_local_mean"]].to_string(float_format="%.4f"))
    return {f"method/{r.source}/{r.method}/global": float(r.cos_global_mean) for r in mdf.itertuples(index=False)}
