"""Statistics of a comparison: mean ± std per (method, rank), and paired tests over seeds.

Runs of one seed share the data order and the initial weights, so method A and B are compared by the
per-seed differences d_s = A_s - B_s:

    mean d ± t_{0.975, n-1} * sd(d) / sqrt(n)   (95 % CI of the mean difference)
    paired t-test (scipy.stats.ttest_rel) and Wilcoxon signed-rank (scipy.stats.wilcoxon)
    effect size d_z = mean(d) / sd(d)            (Cohen's d for paired samples)

With 3 seeds no test can be significant at 5 % unless the differences are very consistent (the smallest
Wilcoxon p with n = 3 is 0.25): the tables say n and never hide an unfavourable sign.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from .methods import paired_baseline


def paired_stats(a: list[float], b: list[float]) -> dict[str, Any]:
    """Paired comparison of per-seed values `a` (method) and `b` (baseline), same seed order.

    Example:
        >>> s = paired_stats([0.81, 0.83, 0.82], [0.80, 0.81, 0.81])
        >>> round(s["mean_diff"], 4), s["n"], s["wins"]
        (0.0133, 3, 3)
    """
    import numpy as np
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    out: dict[str, Any] = {"n": n, "mean_diff": float(d.mean()) if n else math.nan, "wins": int((d > 0).sum()),
                           "losses": int((d < 0).sum()), "ties": int((d == 0).sum())}
    nan = float("nan")
    out.update(std_diff=nan, ci_low=nan, ci_high=nan, t_pvalue=nan, wilcoxon_pvalue=nan, effect_size_dz=nan)
    if n >= 2:
        sd = float(d.std(ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        out.update(std_diff=sd, ci_low=out["mean_diff"] - half, ci_high=out["mean_diff"] + half)
        if sd > 0:
            out["t_pvalue"] = float(stats.ttest_rel(a, b).pvalue)
            out["effect_size_dz"] = out["mean_diff"] / sd
        if np.any(d != 0):
            out["wilcoxon_pvalue"] = float(stats.wilcoxon(d).pvalue)
    return out


def summarize(records: list[dict], baseline: str | None = None) -> dict[str, Any]:
    """Cells (mean, std per metric per (method, rank)) and pairs (each method vs its baseline, per rank)."""
    import numpy as np

    metrics = sorted({k for r in records for k in r["metrics"]}, key=_metric_order)
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["method"], r["rank"])].append(r)
    cells = []
    for (method, rank), rs in groups.items():
        cell = {"method": method, "rank": rank, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                "train_seconds": float(np.mean([r["train_seconds"] for r in rs]))}
        for m in metrics:
            v = [r["metrics"][m] for r in rs if m in r["metrics"]]
            cell[m] = {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
        cells.append(cell)
    pairs = []
    for (method, rank), rs in groups.items():
        base = baseline if baseline and baseline != method else (None if baseline else paired_baseline(method))
        if base is None or (base, rank) not in groups:
            continue
        by_seed = {r["seed"]: r for r in groups[(base, rank)]}
        common = sorted(s for s in (r["seed"] for r in rs) if s in by_seed)
        mine = {r["seed"]: r for r in rs}
        for m in metrics:
            a = [mine[s]["metrics"][m] for s in common]
            b = [by_seed[s]["metrics"][m] for s in common]
            pairs.append({"method": method, "baseline": base, "rank": rank, "metric": m, "seeds": common,
                          **paired_stats(a, b)})
    primary = records[0]["primary_metric"] if records else None
    return {"metrics": metrics, "primary_metric": primary, "cells": cells, "pairs": pairs}


def _metric_order(name: str) -> tuple:
    split = name.split("/")[0]
    rank = {"test": 0, "dev": 1}.get(split, 2)
    return (rank, split, name)


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _p(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3f}"


def to_markdown(summary: dict[str, Any], title: str = "") -> str:
    """Two tables: mean ± std (in %) per method and rank, and the paired differences (in points)."""
    shown = [m for m in summary["metrics"] if m.endswith(("accuracy", "exact_match", "pass@1"))] or summary["metrics"]
    lines = [f"## {title}", ""] if title else []
    lines += ["| method | r | n | " + " | ".join(shown) + " | train s |",
              "|---|---|---|" + "---|" * len(shown) + "---|"]
    for c in sorted(summary["cells"], key=lambda c: c["rank"]):  # methods in the order of the spec
        vals = [f"{_pct(c[m]['mean'])} ± {_pct(c[m]['std'])}" if m in c else "–" for m in shown]
        lines.append(f"| {c['method']} | {c['rank']} | {c['n']} | " + " | ".join(vals) + f" | {c['train_seconds']:.0f} |")
    pairs = [p for p in summary["pairs"] if p["metric"] in shown]
    if pairs:
        lines += ["", "Paired over seeds (method − baseline, points; CI = 95 % of the mean difference):", "",
                  "| method | vs | r | metric | n | Δ mean | 95 % CI | t-test p | Wilcoxon p | d_z | wins/losses |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            dz = "–" if math.isnan(p["effect_size_dz"]) else f"{p['effect_size_dz']:+.2f}"
            lines.append(f"| {p['method']} | {p['baseline']} | {p['rank']} | {p['metric']} | {p['n']} | "
                         f"{100 * p['mean_diff']:+.2f} | [{_signed(p['ci_low'])}, {_signed(p['ci_high'])}] | "
                         f"{_p(p['t_pvalue'])} | {_p(p['wilcoxon_pvalue'])} | {dz} | {p['wins']}/{p['losses']} |")
    return "\n".join(lines) + "\n"


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.2f}"


def write_summary(out_dir: str | Path, records: list[dict], summary: dict[str, Any], title: str = "") -> dict[str, Path]:
    """summary.md, summary.json, runs.csv (one row per run) and pairs.csv in `out_dir`."""
    out = Path(out_dir)
    paths = {"md": out / "summary.md", "json": out / "summary.json", "runs": out / "runs.csv", "pairs": out / "pairs.csv"}
    paths["md"].write_text(to_markdown(summary, title))
    paths["json"].write_text(json.dumps(summary, indent=1, default=str))
    metrics = summary["metrics"]
    with open(paths["runs"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "rank", "seed", *metrics, "train_seconds", "steps"])
        for r in sorted(records, key=lambda r: (r["rank"], r["method"], r["seed"])):
            w.writerow([r["method"], r["rank"], r["seed"], *[r["metrics"].get(m, "") for m in metrics],
                        r["train_seconds"], r["steps"]])
    with open(paths["pairs"], "w", newline="") as f:
        keys = ["method", "baseline", "rank", "metric", "n", "mean_diff", "std_diff", "ci_low", "ci_high",
                "t_pvalue", "wilcoxon_pvalue", "effect_size_dz", "wins", "losses", "ties"]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for p in summary["pairs"]:
            w.writerow(p)
    return paths


def plot_summary(records: list[dict], summary: dict[str, Any], path: str | Path) -> Path:
    """The comparison figure: per-seed values and the paired Δ with its 95 % CI per metric (analysis.plot)."""
    from ..analysis.plot import plot_compare

    return plot_compare(records, summary, path)
