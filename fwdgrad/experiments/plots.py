"""Every figure of the project, drawn on matplotlib ``Figure`` objects (no pyplot, no
backend switched, no display needed: importing this module leaves matplotlib's global state alone).

* a training run's ``plots.png`` (:func:`plot_run`);
* ``global_optim.py``'s ``trajectories.png`` and ``loss.png`` (:func:`plot_trajectories`,
  :func:`plot_loss_curves`);
* ``compare.py``'s ``comparison.png`` (:func:`plot_comparison`);
* ``approx_quality.py``'s ``cosine_vs_k.png`` and ``norm_ratio_vs_k.png`` (:func:`plot_cosine_vs_k`,
  :func:`plot_norm_ratio_vs_k`).

Every function writes one PNG through a temporary file (:func:`_save`), so a reader never sees half a figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from fwdgrad.experiments.quality.theory import expected_cosine
from fwdgrad.experiments.data import Splits  
from fwdgrad.experiments.global_optim.functions import TestFunction  

__all__ = [
    "COMPARISON_PANELS",
    "history_curve",
    "plot_comparison",
    "plot_cosine_vs_angle",
    "plot_cosine_vs_k",
    "plot_loss_curves",
    "plot_norm_ratio_vs_k",
    "plot_run",
    "plot_trajectories",
]

#: One colour per estimator, in the order they are given (matplotlib's default cycle, fixed for both figures).
_COLOURS = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def plot_trajectories(
    function: TestFunction,
    paths: Mapping[str, np.ndarray],
    path: Path,
    title: Optional[str] = None,
    resolution: int = 300,
) -> Path:
    """Contour plot of ``log(1 + f - f*)`` over ``function.bounds`` with each estimator's path on top.

    The start (``function.start_point()``) is a white square, the global minima red stars, each path's last
    point a dot in the path's colour. The window is ``function.bounds``; path segments outside it are clipped.

    Args:
        function: a 2-D test function.
        paths: estimator label -> ``(steps, 2)`` array of iterates, starting at the start point.
        path: the PNG to write.
        title: figure title (default: the function's class name).
        resolution: grid points per axis for the contour.
    """
    if function.dim != 2:
        raise ValueError(f"trajectory plots need a 2-D function, got dim={function.dim}.")
    (x0, x1), (y0, y1) = function.bounds
    xs = torch.linspace(x0, x1, resolution, dtype=torch.float64)
    ys = torch.linspace(y0, y1, resolution, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    # vmap evaluates the per-point function on the whole grid at once (the functions reduce with .sum(), so a
    # plain batched call would sum over the grid).
    values = torch.vmap(function)(torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)).reshape(gx.shape)
    # log(1 + f - f*): f - f* >= 0 spans many decades on these functions; the log keeps the valley visible.
    shifted = torch.log1p((values - function.min_value).clamp_min(0.0))

    fig = Figure(figsize=(6.4, 5.4), dpi=120)
    ax = fig.subplots()
    filled = ax.contourf(gx.numpy(), gy.numpy(), shifted.numpy(), levels=40, cmap="viridis")
    ax.contour(gx.numpy(), gy.numpy(), shifted.numpy(), levels=20, colors="white", linewidths=0.3, alpha=0.5)
    fig.colorbar(filled, ax=ax, label="log(1 + f(x) - f*)")
    for i, (label, points) in enumerate(paths.items()):
        # The first path (the estimator under test) on top: the baseline's smooth path would hide it.
        z = 3 + len(paths) - i
        ax.plot(points[:, 0], points[:, 1], color=_COLOURS[i % len(_COLOURS)], linewidth=1.0,
                alpha=0.9, label=label, zorder=z)
        if len(points):
            ax.plot(points[-1, 0], points[-1, 1], marker="o", markersize=5, color=_COLOURS[i % len(_COLOURS)],
                    markeredgecolor="black", linestyle="none", zorder=z)
    start = function.start_point().numpy()
    ax.plot(start[0], start[1], marker="s", markersize=8, color="white", markeredgecolor="black",
            linestyle="none", label="start", zorder=10)
    minima = np.asarray(function.minima, dtype=float)
    ax.plot(minima[:, 0], minima[:, 1], marker="*", markersize=14, color="red", markeredgecolor="black",
            linestyle="none", label="global minimum", zorder=11)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title or type(function).__name__)
    ax.legend(loc="best", fontsize=8, framealpha=0.85)
    fig.tight_layout()
    _save(fig, Path(path))
    return Path(path)


def plot_loss_curves(
    curves: Mapping[str, Sequence[float]],
    min_value: float,
    path: Path,
    title: str = "",
) -> Path:
    """``f(x_t) - f*`` against iteration t on a log scale, one line per estimator.

    Gaps at or below round-off (``f - f*`` can come out as 0 or a hair below it in float64) are drawn at a
    floor of ``1e-16 max(1, |f*|)`` so that the log axis stays finite.
    """
    floor = 1e-16 * max(1.0, abs(min_value))
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    ax = fig.subplots()
    for i, (label, values) in enumerate(curves.items()):
        gap = np.maximum(np.asarray(values, dtype=float) - min_value, floor)
        ax.plot(np.arange(len(gap)), gap, color=_COLOURS[i % len(_COLOURS)], linewidth=0.8, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("f(x) - f*")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, Path(path))
    return Path(path)


def _save(fig: Any, path: Path, **kwargs: Any) -> None:
    """Save ``fig`` to ``path`` atomically (temporary file, then ``os.replace``) and close it."""
    tmp = path.with_name(path.name + ".tmp" + path.suffix)  # the suffix tells matplotlib the format
    fig.savefig(tmp, **kwargs)
    os.replace(tmp, path)


# -- a training run: plots.png ------------------------------------------------------------------------------
def _series(rows: Sequence[Mapping[str, Any]], tag: str) -> Tuple[List[int], List[float]]:
    points = [(r["step"], r[tag]) for r in rows if r.get(tag) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _misclassified(splits: Optional[Splits], pred: Optional[Tensor], limit: int) -> Optional[Tensor]:
    """Indices of the first ``limit`` misclassified held-out images (None: tabular data, none, or not asked)."""
    if splits is None or pred is None or not splits.is_image or limit <= 0:
        return None
    wrong = torch.nonzero(pred.cpu() != splits.test_y.cpu()).flatten()[:limit]
    return wrong if wrong.numel() else None


def _image_grid(panel: Any, splits: Splits, pred: Tensor, wrong: Tensor) -> None:
    n = wrong.numel()
    cols = min(n, 10)
    axes = panel.subplots(math.ceil(n / cols), cols, squeeze=False)
    panel.suptitle(f"misclassified held-out examples (first {n}): predicted / true")
    mean = torch.tensor(splits.mean).view(-1, 1, 1)
    std = torch.tensor(splits.std).view(-1, 1, 1)
    names = splits.class_names or tuple(str(i) for i in range(splits.num_classes))
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        img = (splits.test_x[i].cpu() * std + mean).clamp(0, 1)  # undo the normalisation
        if img.shape[0] == 1:
            ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(f"{names[int(pred[i])]} / {names[int(splits.test_y[i])]}", fontsize=8)


def plot_run(rows: Sequence[Mapping[str, Any]], path: Path, splits: Optional[Splits] = None,
             pred: Optional[Tensor] = None, num_misclassified: int = 0) -> Optional[Path]:
    """A training run's ``plots.png``: loss and accuracy curves, and a grid of misclassified held-out images.

    Args:
        rows: the run's history (:attr:`fwdgrad.experiments.training.Recorder.rows`); nothing is drawn when it is empty.
        path: the PNG to write.
        splits, pred: the data and the last evaluation's predicted classes, for the image grid (image data
            only; tabular data gets the curves alone).
        num_misclassified: how many misclassified images to show (0: none).
    """
    if not rows:
        return None
    wrong = _misclassified(splits, pred, num_misclassified)
    fig = Figure(figsize=(13, 4.2 if wrong is None else 8.4), layout="constrained")
    top, bottom = (fig, None) if wrong is None else fig.subfigures(2, 1, height_ratios=[1, 1.1])
    ax_loss, ax_acc = top.subplots(1, 2)
    for ax, kind in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for split, style in (("train", "-"), ("test", "o-")):
            tag = f"{split}/{kind}"
            ax.plot(*_series(rows, tag), style, label=tag, markersize=3)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    ax_loss.set_yscale("log")
    if wrong is not None:
        _image_grid(bottom, splits, pred, wrong)
    _save(fig, Path(path), dpi=90)
    return Path(path)


# -- compare.py: comparison.png ---------------------------------------------------------------------------------
#: (x column, y column, y label, x label) of each panel of the comparison figure.
COMPARISON_PANELS = (("step", "train/loss", "train loss", "step"),
                     ("wall_time_s", "train/loss", "train loss", "wall-clock time (s)"),
                     ("step", "test/accuracy", "test accuracy", "step"))


def history_curve(history: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Columns ``x`` and ``y`` of a run's history where both are logged (empty cells dropped)."""
    if x not in history or y not in history:
        return pd.DataFrame(columns=[x, y])
    return history[[x, y]].apply(pd.to_numeric, errors="coerce").dropna()


def plot_comparison(runs: Sequence[Tuple[str, pd.DataFrame]], path: Path) -> Path:
    """Train loss vs step, train loss vs wall-clock time, test accuracy vs step; one line per run.

    Args:
        runs: ``(label, history)`` per run, ``history`` as read from its ``history.csv``.
        path: the PNG to write.
    """
    fig = Figure(figsize=(5.0 * len(COMPARISON_PANELS), 4.0))
    axes = fig.subplots(1, len(COMPARISON_PANELS))
    cmap = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    for i, (label, history) in enumerate(runs):
        for ax, (x, y, _, _) in zip(axes, COMPARISON_PANELS):
            data = history_curve(history, x, y)
            if data.empty:
                continue
            sparse = len(data) <= 30  # evaluations: show the points
            ax.plot(data[x], data[y], color=cmap(i % cmap.N), lw=1.3, marker="o" if sparse else None, ms=3,
                    label=label if ax is axes[0] else None)
    for ax, (_, _, ylabel, xlabel) in zip(axes, COMPARISON_PANELS):
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("train loss vs step")
    axes[1].set_title("train loss vs wall-clock time")
    axes[2].set_title("test accuracy vs step")
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:  # no curves in the first panel: take labels from the runs anyway
        handles = [Line2D([], [], color=cmap(i % cmap.N)) for i in range(len(runs))]
        labels = [label for label, _ in runs]
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=max(1, min(3, len(runs))), fontsize=8, frameon=False)
    _save(fig, Path(path), dpi=120, bbox_inches="tight")
    return Path(path)


# -- approx_quality.py: cosine_vs_k.png, norm_ratio_vs_k.png -----------------------------------------------------
_AGG_COLORS = {"mean": "tab:blue", "sum": "tab:orange", "projection": "tab:green"}
_DIST_STYLES = ["-", "--", ":", "-."]


def _panels(df: pd.DataFrame) -> Tuple[Any, List[str], Any]:
    sources = list(dict.fromkeys(df["source"]))
    fig = Figure(figsize=(4.6 * len(sources), 4.0))
    axes = fig.subplots(1, len(sources), squeeze=False)
    return fig, sources, axes[0]


def _finish(fig: Any, axes: Any, path: Path) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    _save(fig, Path(path), dpi=120, bbox_inches="tight")


def _style(df: pd.DataFrame) -> Tuple[Dict[str, str], Dict[str, str]]:
    dists = list(dict.fromkeys(df["distribution"]))
    colors = {a: _AGG_COLORS.get(a, f"C{i + 3}") for i, a in enumerate(dict.fromkeys(df["aggregation"]))}
    return colors, {d: _DIST_STYLES[i % len(_DIST_STYLES)] for i, d in enumerate(dists)}


def _has_gaussian_theory(aggregation: str, n: int) -> bool:
    try:
        expected_cosine(aggregation, n, 1)
    except ValueError:
        return False
    return True


def _cosine_theory(ax: Any, sub: pd.DataFrame, n: int) -> None:
    """Grey ``sqrt(k/n)``; black: the exact ``E[cos]`` for Gaussian tangents (projection, mean/sum)."""
    ks = np.unique(np.geomspace(1, max(int(sub["k"].max()), 1), 200).round().astype(int))
    kp = ks[ks <= n]
    ax.plot(kp, np.sqrt(kp / n), color="0.5", lw=1.0, label="√(k/n)", zorder=1)
    if "projection" in set(sub["aggregation"]):
        ax.plot(kp, [expected_cosine("projection", n, int(k)) for k in kp], ":", color="k", lw=1.2,
                label="E[cos] projection, Gaussian")
    if any(_has_gaussian_theory(agg, n) for agg in set(sub["aggregation"]) - {"projection"}):
        # mean and sum share a direction, hence one E[cos] curve
        ax.plot(ks, [expected_cosine("mean", n, int(k)) for k in ks], "-.", color="k", lw=1.0,
                label="E[cos] mean/sum, Gaussian")


def _zeroth_order_marks(ax: Any, sub: pd.DataFrame, colors: Dict[str, str]) -> None:
    """x marks: the zeroth-order estimate's mean cosine on the same tangents (column ``zo_cos_mean``), in its
    line's colour; the panel's corner gives the smallest cosine between it and the forward gradient of a draw."""
    if "zo_cos_mean" not in sub or sub["zo_cos_mean"].isna().all():
        return
    for (agg, _), line in sub.groupby(["aggregation", "distribution"], sort=False):
        ax.plot(line["k"], line["zo_cos_mean"], "x", color=colors[agg], ms=6, zorder=4)
    ax.plot([], [], "x", color="k", label="zeroth order, same tangents")
    ax.text(0.98, 0.02, f"min cos(ZO, FG) = {sub['zo_fg_cos_min'].min():.7f}", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=7)


def plot_cosine_vs_k(df: pd.DataFrame, path: Path) -> None:
    """Mean cosine similarity against k (log-log), a line per aggregation and distribution, a panel per source.

    ``df`` is :func:`fwdgrad.experiments.quality.analysis.approx_quality_table`'s table. The spread of the draws (std, 5/50/95 %
    quantiles) is in the CSV. Black lines: the exact ``E[cos]`` for Gaussian tangents (projection dotted,
    mean/sum dash-dotted); grey: ``sqrt(k/n)``. Mean and sum coincide (same direction). x marks: the
    zeroth-order estimates on the same tangents, when the table has them.
    """
    fig, sources, axes = _panels(df)
    colors, styles = _style(df)
    for ax, src in zip(axes, sources):
        sub = df[df["source"] == src]
        n = int(sub["n"].iloc[0])
        for (agg, dist), line in sub.groupby(["aggregation", "distribution"], sort=False):
            line = line.sort_values("k")
            width = 2.6 if agg == "sum" else 1.6  # sum lies under mean: draw it wider so both show
            ax.plot(line["k"], line["cos_mean"], styles[dist], color=colors[agg], lw=width, marker="o", ms=3,
                    alpha=0.85, label=f"{agg}, {dist}", zorder=2 if agg == "sum" else 3)
        _cosine_theory(ax, sub, n)
        _zeroth_order_marks(ax, sub, colors)
        ax.set(xscale="log", yscale="log", xlabel="tangents k", ylabel="cosine similarity to true gradient",
               title=f"{src} (n={n})" if f"n={n}" not in src else src)
        ax.set_ylim(top=1.15)
        ax.grid(True, which="both", alpha=0.25)
    _finish(fig, axes, path)


def plot_norm_ratio_vs_k(df: pd.DataFrame, path: Path) -> None:
    """Mean norm ratio ``|g|/|a|`` against k (log-log), with the Gaussian-tangent RMS ratio in black."""
    fig, sources, axes = _panels(df)
    colors, styles = _style(df)
    for ax, src in zip(axes, sources):
        sub = df[df["source"] == src]
        for (agg, dist), line in sub.groupby(["aggregation", "distribution"], sort=False):
            line = line.sort_values("k")
            ax.plot(line["k"], line["ratio_mean"], styles[dist], color=colors[agg], marker="o", ms=3,
                    label=f"{agg}, {dist}")
        theory = sub.drop_duplicates(["aggregation", "k"]).sort_values("k")
        for i, (agg, t) in enumerate(theory.groupby("aggregation", sort=False)):
            ax.plot(t["k"], t["ratio_rms_expected_gaussian"], ":", color="k", lw=1.0,
                    label="√E[|g|²]/|a|, Gaussian" if i == 0 else None)
        ax.axhline(1.0, color="0.6", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="tangents k", ylabel="|g| / |true gradient|", title=src)
        ax.grid(True, which="both", alpha=0.25)
    _finish(fig, axes, path)


_K_STYLES = ["-", "--", ":", "-."]


def plot_cosine_vs_angle(df: pd.DataFrame, path: Path) -> None:
    """Mean cosine similarity against the angle between the tangents (frog's Sec. 4.3 figure), a panel per source.

    Rows with an ``angle`` (tangents at that angle to the first, :class:`~fwdgrad.estimators.FixedAngle`) make a
    line per (aggregation, k): colour by aggregation, line style by k; rows of other distributions (e.g. normal
    tangents, independent) are drawn as thin horizontal references in the same colour and style.
    """
    fig, sources, axes = _panels(df)
    colors, _ = _style(df)
    ks = sorted(df["k"].unique())
    k_style = {k: _K_STYLES[i % len(_K_STYLES)] for i, k in enumerate(ks)}
    for ax, src in zip(axes, sources):
        sub = df[df["source"] == src]
        angled = sub[sub["angle"].notna()]
        for (agg, k), line in angled.groupby(["aggregation", "k"], sort=False):
            line = line.sort_values("angle")
            ax.plot(line["angle"], line["cos_mean"], k_style[k], color=colors[agg], marker="o", ms=3, lw=1.6,
                    label=f"{agg}, k={k}")
        for (agg, k, dist), ref in sub[sub["angle"].isna()].groupby(["aggregation", "k", "distribution"], sort=False):
            ax.axhline(float(ref["cos_mean"].iloc[0]), ls=k_style[k], color=colors[agg], lw=0.8, alpha=0.5,
                       label=f"{agg}, k={k}, {dist} tangents")
        n = int(sub["n"].iloc[0])
        ax.set(xlabel="angle to the first tangent (degrees)", ylabel="cosine similarity to true gradient",
               title=f"{src} (n={n})" if f"n={n}" not in src else src, ylim=(0, 1.05))
        ax.set_xticks(sorted(angled["angle"].unique()))
        ax.grid(True, alpha=0.25)
    _finish(fig, axes, path)


# -- approx_quality.py with a model source: methods.png ------------------------------------------------------------
def plot_method_cosines(df: pd.DataFrame, path: Path) -> None:
    """Mean cosine similarity (bars, +- one std) of every method to the global gradient and, for methods that
    follow local losses, to the local one; a panel per source point (:mod:`fwdgrad.experiments.quality.method_quality`)."""
    sources = list(dict.fromkeys(df["source"]))
    fig = Figure(figsize=(5.2 * len(sources), 0.45 * df["method"].nunique() + 1.6))
    axes = fig.subplots(1, len(sources), squeeze=False, sharey=True)
    for ax, src in zip(axes[0], sources):
        sub = df[df["source"] == src].reset_index(drop=True)
        pos = np.arange(len(sub))
        ax.barh(pos - 0.2, sub["cos_global_mean"], 0.4, xerr=sub["cos_global_std"], color="tab:blue",
                label="to the global gradient")
        ax.barh(pos + 0.2, sub["cos_local_mean"].fillna(0.0), 0.4, xerr=sub["cos_local_std"].fillna(0.0),
                color="tab:orange", label="to the local (LG-BP) gradient")
        ax.set_yticks(pos, sub["method"])
        ax.invert_yaxis()
        ax.set_xscale("symlog", linthresh=1e-3)  # FG-W's cosines are ~1e-3, the best ~1: log-like, with 0 shown
        ticks = [0, 1e-3, 1e-2, 1e-1, 1]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set(xlabel="cosine similarity (symlog)", title=src)
        ax.set_xlim(-1e-3, 1.05)
        ax.grid(True, axis="x", alpha=0.25)
    _finish(fig, axes[0], path)
