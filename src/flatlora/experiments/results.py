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

    try:
        from scipy import stats
    except ImportError:
        raise ImportError("paired statistics need scipy: pip install 'flatlora[experiments]'") from None
    if len(a) != len(b):
        raise ValueError(f"paired values need the same length, got {len(a)} and {len(b)}")
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    out: dict[str, Any] = {"n": n, "mean_diff": float(d.mean()) if n else math.nan, "wins": int((d > 0).sum()),
                           "losses": int((d < 0).sum()), "ties": int((d == 0).sum())}
    nan = float("nan")
    out.update(std_diff=nan, ci_low=nan, ci_high=nan, t_pvalue=nan, wilcoxon_pvalue=nan, effect_size_dz=nan,
               detectable_diff=nan)
    if n >= 2:
        sd = float(d.std(ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
        out.update(std_diff=sd, ci_low=out["mean_diff"] - half, ci_high=out["mean_diff"] + half,
                   detectable_diff=detectable_difference(sd, n))
        if sd > 0:
            out["t_pvalue"] = float(stats.ttest_rel(a, b).pvalue)
            out["effect_size_dz"] = out["mean_diff"] / sd
        if np.any(d != 0):
            out["wilcoxon_pvalue"] = float(stats.wilcoxon(d).pvalue)
    return out


def detectable_difference(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The true mean paired difference that a two-sided paired t-test at `alpha` over `n` pairs finds with
    probability `power`, when the differences scatter with standard deviation `sd` (noncentral t). With the
    observed sd it says what a "no detectable effect" rules out: effects this large or larger would most
    likely have been seen. NaN below 2 pairs or for sd 0.

    Example:
        >>> round(detectable_difference(1.0, 10), 3)  # ~ (t_.975 + t_.80) sd / sqrt(n) = 0.99
        0.996
    """
    from scipy import optimize, stats

    if n < 2 or not 0 < sd < math.inf:
        return float("nan")
    df, crit = n - 1, float(stats.t.ppf(1 - alpha / 2, n - 1))

    def short(delta: float) -> float:  # power at a true difference delta, minus the power wanted
        nc = delta * math.sqrt(n) / sd
        # the far tail (a significant result of the wrong sign): below 1e-8 once it matters, and scipy's nct
        # returns NaN for it at 1-2 degrees of freedom and a large nc
        wrong = float(stats.nct.cdf(-crit, df, nc))
        return float(stats.nct.sf(crit, df, nc)) + (0.0 if math.isnan(wrong) else wrong) - power

    hi = (crit + 3.0) * sd / math.sqrt(n)
    while short(hi) < 0:  # heavy tails at 2-3 pairs: widen until the power is reached
        hi *= 2
    return float(optimize.brentq(short, 0.0, hi, xtol=1e-9 * sd))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value, NaN for none).

    Example:
        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    import numpy as np

    if not values:
        return math.nan, math.nan
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def summarize(records: list[dict], baseline: str | None = None, errors: list[dict] | None = None) -> dict[str, Any]:
    """Cells (mean, std per metric per (method, rank)) and pairs (each method vs its baseline, per rank).

    A cell also carries the mean `train_seconds` and `eval_seconds` of its runs (NaN when none recorded it).
    Only runs with `status: done` enter the statistics; failed runs (diverged) are listed under "failed"
    and counted per cell, and a seed where either side failed is left out of that pair. `errors` are runs
    that raised (no results; retried on resume): listed as given.
    """
    done = [r for r in records if r.get("status", "done") == "done"]
    metrics = sorted({k for r in done for k in r["metrics"]}, key=_metric_order)
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    failed_in: dict[tuple[str, int], list[int]] = defaultdict(list)
    for r in records:
        if r.get("status", "done") == "done":
            groups[(r["method"], r["rank"])].append(r)
        else:
            failed_in[(r["method"], r["rank"])].append(r["seed"])
            groups.setdefault((r["method"], r["rank"]), [])
    cells = []
    for (method, rank), rs in groups.items():
        cell = {"method": method, "rank": rank, "n": len(rs), "seeds": sorted(r["seed"] for r in rs),
                "failed_seeds": sorted(failed_in[(method, rank)]),
                "train_seconds": mean_std([r["train_seconds"] for r in rs])[0],
                "eval_seconds": mean_std([r["eval_seconds"] for r in rs if "eval_seconds" in r])[0]}
        for m in metrics:
            v = [r["metrics"][m] for r in rs if m in r["metrics"]]
            if v:
                mean, std = mean_std(v)
                cell[m] = {"mean": mean, "std": std}
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
            seeds = [s for s in common if m in mine[s]["metrics"] and m in by_seed[s]["metrics"]]
            a = [mine[s]["metrics"][m] for s in seeds]
            b = [by_seed[s]["metrics"][m] for s in seeds]
            pairs.append({"method": method, "baseline": base, "rank": rank, "metric": m, "seeds": seeds,
                          **paired_stats(a, b)})
    primary = next((r["primary_metric"] for r in records), None)
    failed = [{"method": r["method"], "rank": r["rank"], "seed": r["seed"], "reason": r.get("failure") or "failed"}
              for r in records if r.get("status", "done") != "done"]
    return {"metrics": metrics, "primary_metric": primary, "cells": cells, "pairs": pairs, "failed": failed,
            "errors": list(errors or [])}


def _metric_order(name: str) -> tuple:
    split = name.split("/")[0]
    rank = {"test": 0, "dev": 1}.get(split, 2)
    return (rank, split, name)


def _pct(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _p(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3f}"


def to_markdown(summary: dict[str, Any], title: str = "", note: str = "") -> str:
    """Two tables: mean ± std (in %) per method and rank, and the paired differences (in points); then the
    runs that failed or raised, by name and reason."""
    shown = [m for m in summary["metrics"] if m.endswith(("accuracy", "exact_match", "pass@1"))] or summary["metrics"]
    any_failed = any(c.get("failed_seeds") for c in summary["cells"])
    lines = [f"## {title}", ""] if title else []
    if note:
        lines += [note, ""]
    lines += ["| method | r | n | " + " | ".join(shown) + " | train s |" + (" failed |" if any_failed else ""),
              "|---|---|---|" + "---|" * len(shown) + "---|" + ("---|" if any_failed else "")]
    for c in sorted(summary["cells"], key=lambda c: c["rank"]):  # methods in the order of the spec
        vals = [f"{_pct(c[m]['mean'])} ± {_pct(c[m]['std'])}" if m in c else "–" for m in shown]
        secs = "–" if math.isnan(c["train_seconds"]) else f"{c['train_seconds']:.0f}"
        failed = (" " + (", ".join(f"seed {s}" for s in c["failed_seeds"]) or "–") + " |") if any_failed else ""
        lines.append(f"| {c['method']} | {c['rank']} | {c['n']} | " + " | ".join(vals) + f" | {secs} |" + failed)
    pairs = [p for p in summary["pairs"] if p["metric"] in shown]
    if pairs:
        lines += ["", "Paired over seeds (method − baseline, points; CI = 95 % of the mean difference; detectable Δ: the "
                  "true difference these pairs find with 80 % power):", "",
                  "| method | vs | r | metric | n | Δ mean | 95 % CI | detectable Δ (80 % power) | t-test p | Wilcoxon p | d_z "
                  "| wins/losses |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            dz = "–" if math.isnan(p["effect_size_dz"]) else f"{p['effect_size_dz']:+.2f}"
            det = p.get("detectable_diff", math.nan)
            det = "–" if math.isnan(det) else f"±{100 * det:.2f}"
            lines.append(f"| {p['method']} | {p['baseline']} | {p['rank']} | {p['metric']} | {p['n']} | "
                         f"{_signed(p['mean_diff'])} | [{_signed(p['ci_low'])}, {_signed(p['ci_high'])}] | {det} | "
                         f"{_p(p['t_pvalue'])} | {_p(p['wilcoxon_pvalue'])} | {dz} | {p['wins']}/{p['losses']} |")
    if summary.get("failed"):
        lines += ["", "Failed runs (saved with their reason, left out of the statistics; delete a folder to retry it):", ""]
        lines += [f"- {f['method']} r={f['rank']} seed {f['seed']}: {f['reason']}" for f in summary["failed"]]
    if summary.get("errors"):
        lines += ["", "Runs that raised an error (no results; running the same command again retries them):", ""]
        lines += [f"- {e['run']}: {e['error']}" for e in summary["errors"]]
    return "\n".join(lines) + "\n"


def _signed(x: float) -> str:
    return "–" if math.isnan(x) else f"{100 * x:+.2f}"


def write_summary(out_dir: str | Path, records: list[dict], summary: dict[str, Any], title: str = "",
                  note: str = "") -> dict[str, Path]:
    """summary.md, summary.json, runs.csv (one row per run, failed ones with their reason) and pairs.csv."""
    out = Path(out_dir)
    paths = {"md": out / "summary.md", "json": out / "summary.json", "runs": out / "runs.csv", "pairs": out / "pairs.csv"}
    paths["md"].write_text(to_markdown(summary, title, note))
    paths["json"].write_text(json.dumps(summary, indent=1, default=str))
    metrics = summary["metrics"]
    with open(paths["runs"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "rank", "seed", "status", *metrics, "train_seconds", "steps", "failure"])
        for r in sorted(records, key=lambda r: (r["rank"], r["method"], r["seed"])):
            w.writerow([r["method"], r["rank"], r["seed"], r.get("status", "done"), *[r["metrics"].get(m, "") for m in metrics],
                        r["train_seconds"], r["steps"], r.get("failure") or ""])
    with open(paths["pairs"], "w", newline="") as f:
        keys = ["method", "baseline", "rank", "metric", "n", "mean_diff", "std_diff", "ci_low", "ci_high",
                "t_pvalue", "wilcoxon_pvalue", "effect_size_dz", "detectable_diff", "wins", "losses", "ties"]
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for p in summary["pairs"]:
            w.writerow(p)
    return paths


def plot_summary(records: list[dict], summary: dict[str, Any], path: str | Path) -> Path:
    """The comparison figure: per-seed values and the paired Δ with its 95 % CI per metric (analysis.plot)."""
    from ..analysis.plot import plot_compare

    records = [r for r in records if r.get("status", "done") == "done"]  # failed runs have no metrics
    return plot_compare(records, summary, path)
