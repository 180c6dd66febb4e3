"""Figures for flatlora.analysis: side-by-side surfaces on one colour scale, 1-D curves, a sharpness table.

matplotlib is imported inside each function (the [plot] extra) with the Agg backend, so
`import flatlora.analysis` stays torch-only and plotting works without a display.

Surfaces of several models (e.g. LoRA vs Flat-LoRA) share one colour normalisation, one set of contour
levels and one z-range: equal colours mean equal losses across panels, as in the paper's Fig. 3.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from .landscape import LandscapeResult
from .sharpness import SharpnessResult


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finite(values) -> list[float]:
    return [v for row in values for v in (row if isinstance(row, list) else [row]) if v is not None and math.isfinite(v)]


def shared_range(results: Sequence[LandscapeResult], key: str = "loss", vmax: float | None = None) -> tuple[float, float]:
    """(vmin, vmax) over all results; an explicit `vmax` caps the scale so that one exploding corner does not
    wash out the basins (values above it are drawn at the cap)."""
    vals = [v for r in results for v in _finite(getattr(r, key) or [])]
    lo, hi = min(vals), max(vals)
    if vmax is not None:
        hi = min(hi, vmax)
    return lo, hi if hi > lo else lo + 1e-12


def plot_surfaces(results: Mapping[str, LandscapeResult], path: str | Path, *, key: str = "loss",
                  title: str | None = None, levels: int = 20, vmax: float | None = None) -> Path:
    """Contour (top row) and 3-D surface (bottom row) per 2-D result, one colour scale for all; writes `path`.

    Example:
        >>> # plot_surfaces({"LoRA": res_lora, "Flat-LoRA": res_flat}, "landscape.png")
    """
    plt = _plt()
    import numpy as np
    from matplotlib import colors

    items = [(k, r) for k, r in results.items() if r.dims == 2]
    if not items:
        raise ValueError("plot_surfaces needs 2-D LandscapeResults (dims=2)")
    lo, hi = shared_range([r for _, r in items], key, vmax)
    norm = colors.Normalize(vmin=lo, vmax=hi)
    lv = np.linspace(lo, hi, levels)
    fig = plt.figure(figsize=(5.0 * len(items) + 1.0, 9))
    mappable = None
    for col, (label, r) in enumerate(items):
        X, Y = np.meshgrid(np.array(r.axes[0]), np.array(r.axes[1]), indexing="ij")
        Z = np.clip(np.array(getattr(r, key), dtype=float), lo, hi)
        ax = fig.add_subplot(2, len(items), col + 1)
        mappable = ax.contourf(X, Y, Z, levels=lv, cmap="viridis", norm=norm)
        ax.contour(X, Y, Z, levels=lv, colors="white", linewidths=0.4, alpha=0.6)
        ax.plot([0], [0], "r+", ms=10)
        ax.set_title(label)
        ax.set_xlabel("α (direction 1)")
        ax.set_ylabel("β (direction 2)")
        ax.set_aspect("equal")
        ax3 = fig.add_subplot(2, len(items), len(items) + col + 1, projection="3d")
        ax3.plot_surface(X, Y, Z, cmap="viridis", norm=norm, linewidth=0, antialiased=True)
        ax3.set_zlim(lo, hi)
        ax3.set_xlabel("α")
        ax3.set_ylabel("β")
        ax3.set_zlabel(key, labelpad=12)
        ax3.tick_params(axis="z", pad=6)
    fig.subplots_adjust(wspace=0.45, hspace=0.25)
    fig.colorbar(mappable, ax=fig.axes, shrink=0.6, label=key)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curves(results: Mapping[str, LandscapeResult], path: str | Path, *, title: str | None = None) -> Path:
    """1-D results: loss along the direction per model (and the metric in a second panel when recorded)."""
    plt = _plt()

    items = [(k, r) for k, r in results.items() if r.dims == 1]
    if not items:
        raise ValueError("plot_curves needs 1-D LandscapeResults (dims=1)")
    has_metric = any(r.metric is not None for _, r in items)
    fig, axes = plt.subplots(1, 2 if has_metric else 1, figsize=(10 if has_metric else 5.5, 4), squeeze=False)
    for label, r in items:
        axes[0][0].plot(r.axes[0], r.loss, marker="o", ms=3, label=label)
        if has_metric and r.metric is not None:
            axes[0][1].plot(r.axes[0], r.metric, marker="o", ms=3, label=label)
    axes[0][0].set_xlabel("α (filter-normalised direction)")
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend()
    if has_metric:
        axes[0][1].set_xlabel("α (filter-normalised direction)")
        axes[0][1].set_ylabel("metric")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def sharpness_rows(reports: Mapping[str, SharpnessResult]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the sharpness table, '±' columns folded into their value."""
    cols: list[str] = []
    for rep in reports.values():
        for c in rep.summary():
            if c not in cols and not c.endswith(" ±"):
                cols.append(c)
    rows = []
    for label, rep in reports.items():
        s = rep.summary()
        cells = [label]
        for c in cols:
            cell = _fmt(s.get(c))
            if f"{c} ±" in s:
                cell += f" ± {_fmt(s[f'{c} ±'])}"
            cells.append(cell)
        rows.append(cells)
    return ["model"] + cols, rows


def sharpness_markdown(reports: Mapping[str, SharpnessResult]) -> str:
    """The sharpness table as GitHub markdown (± = 95 % CI half-width)."""
    header, rows = sharpness_rows(reports)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot_sharpness_table(reports: Mapping[str, SharpnessResult], path: str | Path, *, title: str | None = None) -> Path:
    """The sharpness table as an image (for a figure beside the surfaces)."""
    plt = _plt()

    header, rows = sharpness_rows(reports)
    fig, ax = plt.subplots(figsize=(min(2.0 + 1.7 * len(header), 22), 0.6 + 0.45 * (len(rows) + 1)))
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.4)
    ax.set_title(title or "sharpness of W' (± = 95% CI)", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path
