"""Figures: loss surfaces and their difference, 1-D curves, sharpness differences, compare results, training curves.

matplotlib is imported inside each function (the [plot] extra) with the Agg backend, so
`import flatlora.analysis` stays torch-only and plotting works without a display.

- `plot_surfaces`: surfaces of several models (e.g. LoRA vs Flat-LoRA) on one colour normalisation, one
  set of contour levels and one z-range (equal colours = equal losses, as in the paper's Fig. 3), plus
  the difference of each later model from the first on its own diverging scale.
- `plot_sharpness`: each sharpness number as a difference from the first model with its 95 % interval.
- `plot_compare`: a comparison's per-seed values and, below, the paired Δ per metric with its 95 % CI.
- `plot_training_curves`: loss and σ against step, mean over seeds per method, from runs' curve.csv.
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
    """Contour (top row) and 3-D surface (bottom row) per 2-D result, one colour scale for all, then one
    column per later model with its difference from the first (model − first, diverging scale); writes `path`.

    Example:
        >>> import tempfile, torch
        >>> from flatlora.analysis import loss_landscape
        >>> net, x = torch.nn.Linear(3, 2), torch.ones(4, 3)
        >>> res = {name: loss_landscape(net, lambda m: k * m(x).pow(2).mean(), dims=2, steps=3)
        ...        for name, k in [("LoRA", 2.0), ("Flat-LoRA", 1.0)]}
        >>> plot_surfaces(res, tempfile.mkdtemp() + "/s.png").suffix
        '.png'
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
    base_label, base = items[0]
    diffs = [(label, r) for label, r in items[1:] if r.axes == base.axes]
    n = len(items)
    fig = plt.figure(figsize=(4.6 * (n + len(diffs)) + 1.2 * (1 + len(diffs)), 8.4))
    # Each colour bar gets a narrow column of its own after the panels it explains (the models' shared
    # scale, then each difference's): drawn over the 3-D panels (as `colorbar(ax=...)` did) it hid the
    # rightmost z-label.
    widths = [1] * n + [0.06] + [w for _ in diffs for w in (0.3, 1, 0.06)]  # 0.3: room for the bar's label
    grid = fig.add_gridspec(2, len(widths), width_ratios=widths, wspace=0.55, hspace=0.18)

    def grid_of(r):
        X, Y = np.meshgrid(np.array(r.axes[0]), np.array(r.axes[1]), indexing="ij")
        return X, Y, np.array(getattr(r, key), dtype=float)

    def surface3d(cell, X, Y, Z, cmap, cnorm, zlabel, zlim):
        ax3 = fig.add_subplot(cell, projection="3d")
        ax3.plot_surface(X, Y, Z, cmap=cmap, norm=cnorm, linewidth=0, antialiased=True)
        ax3.set_zlim(*zlim)
        ax3.set_xlabel("α")
        ax3.set_ylabel("β")
        ax3.set_zlabel(zlabel, labelpad=10)
        ax3.set_box_aspect(None, zoom=0.82)  # leaves room inside the panel for the z tick labels and label
        return ax3

    mappable = None
    for col, (label, r) in enumerate(items):
        X, Y, Z = grid_of(r)
        Z = np.clip(Z, lo, hi)
        ax = fig.add_subplot(grid[0, col])
        mappable = ax.contourf(X, Y, Z, levels=lv, cmap="viridis", norm=norm)
        ax.contour(X, Y, Z, levels=lv, colors="white", linewidths=0.4, alpha=0.6)
        ax.plot([0], [0], "r+", ms=10)
        ax.set_title(label)
        ax.set_xlabel("α (direction 1)")
        ax.set_ylabel("β (direction 2)")
        ax.set_aspect("equal")
        surface3d(grid[1, col], X, Y, Z, "viridis", norm, key, (lo, hi))
    from matplotlib.ticker import MaxNLocator

    def colour_bar(m, col, label):
        cb = fig.colorbar(m, cax=fig.add_subplot(grid[0, col]), label=label)
        cb.locator = MaxNLocator(6)
        cb.formatter.set_powerlimits((-3, 3))
        cb.update_ticks()

    colour_bar(mappable, n, key)
    for j, (label, r) in enumerate(diffs):
        col = n + 2 + 3 * j
        X, Y, Z = grid_of(r)
        D = Z - grid_of(base)[2]
        m = float(np.nanmax(np.abs(D))) or 1e-12
        dnorm = colors.TwoSlopeNorm(vcenter=0.0, vmin=-m, vmax=m)
        ax = fig.add_subplot(grid[0, col])
        cs = ax.contourf(X, Y, D, levels=np.linspace(-m, m, levels + 1), cmap="RdBu_r", norm=dnorm)
        ax.contour(X, Y, D, levels=[0.0], colors="k", linewidths=0.8)
        ax.plot([0], [0], "k+", ms=10)
        ax.set_title(f"{label} − {base_label}\n(blue: lower {key})", fontsize=10)
        ax.set_xlabel("α (direction 1)")
        ax.set_ylabel("β (direction 2)")
        ax.set_aspect("equal")
        colour_bar(cs, col + 1, f"Δ {key}")
        surface3d(grid[1, col], X, Y, D, "RdBu_r", dnorm, f"Δ {key}", (-m, m))
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


def plot_sharpness(reports: Mapping[str, SharpnessResult], path: str | Path, *, title: str | None = None) -> Path:
    """Each sharpness number of every later model as a difference from the first, in % of the first's value.

    Left: expected sharpness per σ, paired draw by draw (same noise for both models: `paired_difference`),
    with its 95 % t-interval. Right: worst-case sharpness and λ_max (one number each: no interval) and the
    Hutchinson trace (interval from both models' intervals, unpaired: conservative). Below zero = flatter.
    """
    plt = _plt()
    import numpy as np

    from .sharpness import paired_difference

    labels = list(reports)
    if len(labels) < 2:
        raise ValueError("plot_sharpness compares models: give at least 2 SharpnessResults")
    first = reports[labels[0]]
    others = labels[1:]
    width = 0.8 / len(others)
    fig, (ax_e, ax_o) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.2, 1]})
    sigmas = [row["sigma"] for row in first.expected]
    for k, lab in enumerate(others):
        rows = reports[lab].expected
        xs, ys, es = [], [], []
        for i, (a, b) in enumerate(zip(first.expected, rows)):
            if a["sigma"] != b["sigma"] or len(a.get("draws", [])) != len(b.get("draws", [])) or not a.get("draws"):
                continue
            d = paired_difference(a, b)
            scale = 100.0 / abs(a["increase"]) if a["increase"] else float("nan")
            xs.append(i + (k - (len(others) - 1) / 2) * width)
            ys.append(d["difference"] * scale)
            es.append(d["ci95"] * scale)
        ax_e.errorbar(xs, ys, yerr=es, fmt="o", capsize=4, color=f"C{k + 1}", label=f"{lab} (n={rows[0]['n'] if rows else 0} paired draws)")
    ax_e.axhline(0, color="k", lw=0.8)
    ax_e.set_xticks(range(len(sigmas)), [f"σ={s:g}" for s in sigmas])
    ax_e.set_ylabel(f"Δ expected sharpness\n(% of {labels[0]}'s)")
    ax_e.set_title("expected sharpness, paired draws, 95 % CI", fontsize=9)
    ax_e.legend(fontsize=8)

    def measures(r: SharpnessResult) -> dict[str, tuple[float, float]]:
        out = {}
        if r.worst_case:
            out[f"max-sharp ρ={r.worst_case['rho']:g}"] = (r.worst_case["increase"], float("nan"))
        if r.hessian:
            out["λ_max" + ("" if r.hessian.get("converged", True) else " (not converged)")] = (r.hessian["eigenvalue"], float("nan"))
            out["tr H"] = (r.hessian["trace"], r.hessian.get("trace_ci95", float("nan")))
        return out

    base = measures(first)
    names = list(base)
    for k, lab in enumerate(others):
        mine = measures(reports[lab])
        for i, name in enumerate(names):
            if name not in mine or not base[name][0]:
                continue
            (va, ca), (vb, cb) = base[name], mine[name]
            scale = 100.0 / abs(va)
            x = i + (k - (len(others) - 1) / 2) * width
            ci = float(np.hypot(ca, cb)) * scale if not (np.isnan(ca) or np.isnan(cb)) else None
            ax_o.errorbar([x], [(vb - va) * scale], yerr=None if ci is None else [ci], capsize=4, color=f"C{k + 1}",
                          fmt="o" if ci is not None else "D", mfc="white" if ci is None else f"C{k + 1}",
                          label=lab if i == 0 else None)
    ax_o.axhline(0, color="k", lw=0.8)
    ax_o.set_xticks(range(len(names)), names, fontsize=8)
    ax_o.set_ylabel(f"Δ (% of {labels[0]}'s)")
    ax_o.set_title("other measures (◇ one value: no interval; tr H: unpaired 95 % CI)", fontsize=9)
    fig.suptitle(title or f"sharpness of W': model − {labels[0]} (below 0: flatter)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- comparisons (flatlora compare)
def _nothing_finished(plt, summary: Mapping, path: str | Path) -> Path:
    failed = [f"{c['method']} r={c['rank']}" for c in summary.get("cells", [])]
    errors = len(summary.get("errors") or [])
    lines = ["no run finished: nothing to plot"]
    if failed:
        lines.append("failed: " + ", ".join(failed[:6]) + (" ..." if len(failed) > 6 else ""))
    if errors:
        lines.append(f"{errors} run(s) raised an error")
    lines.append("(reasons in summary.md)")
    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.axis("off")
    ax.text(0.5, 0.5, "\n".join(lines), ha="center", va="center", fontsize=10, transform=ax.transAxes)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shown_metrics(summary: Mapping) -> list[str]:
    return [m for m in summary["metrics"] if m.endswith(("accuracy", "exact_match", "pass@1"))][:4] or summary["metrics"][:4]


def plot_compare(records: list[dict], summary: Mapping, path: str | Path) -> Path:
    """Per metric: per-seed values of every (method, rank) (top) and the paired Δ vs the baseline with its
    95 % CI and the per-seed differences (bottom, in points): the actual result of a comparison.

    `records` are the runs' metrics.json records, `summary` what `experiments.results.summarize` returns.
    """
    plt = _plt()

    shown = _shown_metrics(summary)
    cells = sorted(summary["cells"], key=lambda c: c["rank"])  # methods in the order of the spec
    if not records or not shown:  # every run failed or raised: a figure that says so replaces any older one
        return _nothing_finished(plt, summary, path)
    labels = [f"{c['method']}\nr={c['rank']}" for c in cells]
    pairs = [p for p in summary["pairs"] if p["metric"] in shown]
    rows = 2 if pairs else 1
    fig, axes = plt.subplots(rows, len(shown), figsize=(3.4 * len(shown) + 1, 3.4 * rows + 0.4), squeeze=False)
    value = {(r["method"], r["rank"], r["seed"]): r["metrics"] for r in records}
    seeds = sorted({r["seed"] for r in records})
    for ax, m in zip(axes[0], shown):
        for x, c in enumerate(cells):
            if m in c:
                ax.bar(x, 100 * c[m]["mean"], yerr=100 * c[m]["std"], color=f"C{x % 10}", alpha=0.35, capsize=3)
        for s in seeds:
            ys = [100 * value.get((c["method"], c["rank"], s), {}).get(m, float("nan")) for c in cells]
            ax.plot(range(len(cells)), ys, "o-", color="k", alpha=0.5, lw=0.8, ms=3)
        means = [(100 * c[m]["mean"], 100 * c[m]["std"]) for c in cells if m in c]
        lo, hi = min(a - b for a, b in means), max(a + b for a, b in means)
        pad = max(0.5, 0.3 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xticks(range(len(cells)), labels, fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.set_ylabel("%")
    if pairs:
        for ax, m in zip(axes[1], shown):
            mine = [p for p in pairs if p["metric"] == m]
            for x, p in enumerate(mine):
                lo_ci, hi_ci, mean = (100 * p[k] for k in ("ci_low", "ci_high", "mean_diff"))
                has_ci = not (math.isnan(lo_ci) or math.isnan(hi_ci))
                ax.errorbar([x], [mean], yerr=[[mean - lo_ci], [hi_ci - mean]] if has_ci else None, fmt="s", ms=6,
                            capsize=5, color="C3", zorder=3)
                per_seed = [100 * (value[(p["method"], p["rank"], s)][m] - value[(p["baseline"], p["rank"], s)][m])
                            for s in p["seeds"]]
                ax.plot([x + 0.18] * len(per_seed), per_seed, "o", color="k", alpha=0.5, ms=3)
                ax.annotate(f"{mean:+.2f}" + (f"\n[{lo_ci:+.2f}, {hi_ci:+.2f}]" if has_ci else ""), (x, mean),
                            textcoords="offset points", xytext=(-40, 0), ha="right", va="center", fontsize=7)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xlim(-1.0, len(mine) - 0.4)
            ax.set_xticks(range(len(mine)), [f"{p['method']} − {p['baseline']}\nr={p['rank']}, n={p['n']}" for p in mine],
                          fontsize=8)
            ax.set_ylabel("Δ (points)")
            ax.set_title(f"paired Δ {m}, 95 % CI", fontsize=9)
    fig.suptitle("top: mean ± std over seeds, dots joined = one seed · bottom: paired difference "
                 "(■ mean, bars 95 % t-interval, dots per seed)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_curves(run_dirs: Sequence[str | Path]) -> dict[tuple[str, int], dict[int, list[dict[str, float]]]]:
    """{(method, rank): {seed: [curve.csv rows as floats]}} of finished run folders (metrics.json names the run);
    a run's curve may be gzipped (curve.csv.gz: the committed evidence keeps its curves that way)."""
    import csv
    import gzip
    import json

    out: dict[tuple[str, int], dict[int, list[dict[str, float]]]] = {}
    for d in map(Path, run_dirs):
        curve = next((c for c in (d / "curve.csv", d / "curve.csv.gz") if c.exists()), None)
        if curve is None or not (d / "metrics.json").exists():
            continue
        rec = json.loads((d / "metrics.json").read_text())
        with (gzip.open if curve.suffix == ".gz" else open)(curve, "rt", newline="") as f:
            rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
        out.setdefault((rec["method"], int(rec["rank"])), {})[int(rec["seed"])] = rows
    return out


def plot_training_curves(run_dirs: Sequence[str | Path], path: str | Path, *, title: str | None = None) -> Path:
    """Training loss (mean over seeds, with a running mean) and σ_t against step, one line per (method, rank);
    `run_dirs` are run folders of `flatlora run`/`compare` (e.g. the children of `<out_dir>/runs`)."""
    plt = _plt()
    import numpy as np

    curves = read_curves(run_dirs)
    if not curves:
        raise ValueError("plot_training_curves found no finished runs (a folder with curve.csv or curve.csv.gz and metrics.json)")
    fig, (ax_l, ax_s) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1.6, 1]})
    for k, ((method, rank), by_seed) in enumerate(sorted(curves.items(), key=lambda kv: kv[0][1])):  # run order per rank
        n = min(len(rows) for rows in by_seed.values())
        steps = np.array([r["step"] for r in next(iter(by_seed.values()))[:n]])
        loss = np.mean([[r["loss"] for r in rows[:n]] for rows in by_seed.values()], axis=0)
        sigma = np.mean([[r.get("sigma", 0.0) for r in rows[:n]] for rows in by_seed.values()], axis=0)
        w = max(1, n // 15)
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        label = f"{method} r={rank} (mean of {len(by_seed)} seed{'s' if len(by_seed) > 1 else ''})"
        ax_l.plot(steps, loss, color=f"C{k}", alpha=0.25, lw=0.8)
        ax_l.plot(steps[w - 1:], smooth, color=f"C{k}", lw=1.8, label=label)
        ax_s.plot(steps, sigma, color=f"C{k}", lw=1.8, label=label)
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("training loss")
    ax_l.set_title("loss per step (faint) and its running mean", fontsize=9)
    ax_l.legend(fontsize=8)
    ax_s.set_xlabel("step")
    ax_s.set_ylabel("σ_t")
    ax_s.set_title("Flat-LoRA noise scale σ_t (0 for other methods)", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
