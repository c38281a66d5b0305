"""Figures for the experiments, drawn with matplotlib's non-interactive Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fwdgrad.functions import TestFunction  # noqa: E402

__all__ = ["plot_trajectories", "plot_loss_curves"]

#: One colour per estimator, in the order they are given (matplotlib's default cycle, fixed for both figures).
_COLOURS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


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

    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=120)
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
    fig.savefig(path)
    plt.close(fig)
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
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
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
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
