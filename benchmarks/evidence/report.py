"""RESULTS.md from the committed evidence results (benchmarks/results/evidence/<study>/<stage>/).

    python benchmarks/evidence/report.py                       # -> RESULTS.md + figures under benchmarks/results/evidence/
    python benchmarks/evidence/report.py --results DIR --out X.md

Everything in the report is read from the files `study.py` wrote: the protocol from each study's
study.yaml, commands.jsonl and the runs' env.json; the tables from the stages' summary.json and
choice.json. The statistics of a comparison are flatlora's own (flatlora.experiments.results:
paired t-test, Wilcoxon signed-rank, d_z, the 95 % CI of the mean paired difference and the difference the pairs
detect with 80 % power, scipy).
Every sentence of the conclusions is derived from those numbers by the rules in `verdict` and
`headroom_verdict`; none is written by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "evidence"
STUDY_ORDER = ("text", "image", "llm", "llm_qlora")
STAGES = ("headroom", "recipe", "sigma", "main", "sharpness", "ranks", "variants", "sam")


# ---------------------------------------------------------------------- loading
def load_results(results: Path) -> dict[str, dict]:
    """{study: {'config', 'commands', 'env', stage: {'summary', 'choice'}}} for every study folder found."""
    import yaml

    out: dict[str, dict] = {}
    if not results.is_dir():
        return out
    names = sorted((p.name for p in results.iterdir() if p.is_dir() and (p / "study.yaml").exists()),
                   key=lambda n: (STUDY_ORDER.index(n) if n in STUDY_ORDER else len(STUDY_ORDER), n))
    for name in names:
        d = results / name
        s: dict[str, Any] = {"config": yaml.safe_load((d / "study.yaml").read_text()), "dir": d}
        s["commands"] = [json.loads(line) for line in (d / "commands.jsonl").read_text().splitlines() if line.strip()] \
            if (d / "commands.jsonl").exists() else []
        env = next(iter(sorted(d.glob("*/runs/*/env.json")) + sorted(d.glob("*/*/runs/*/env.json"))), None)
        s["env"] = json.loads(env.read_text()) if env else {}
        for stage in STAGES:
            sd = d / stage
            if (sd / "summary.json").exists():
                s[stage] = {"summary": json.loads((sd / "summary.json").read_text()),
                            "choice": json.loads((sd / "choice.json").read_text()) if (sd / "choice.json").exists() else None}
        if (d / "humaneval_base.json").exists():  # benchmarks/evidence/humaneval_check.py
            s["humaneval"] = json.loads((d / "humaneval_base.json").read_text())
        out[name] = s
    return out


# ---------------------------------------------------------------------- formatting
def pct(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def pts(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.2f}"


def pval(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.3f}" if x >= 0.001 else f"{x:.1e}"


def num(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def secs(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def detectable(p: dict) -> float:
    """The pair's true Δ found with 80 % power (`detectable_diff`; from its n and std_diff for summaries
    written before that field existed)."""
    d = p.get("detectable_diff")
    if d is None:
        from flatlora.experiments.results import detectable_difference

        sd = p.get("std_diff")
        d = detectable_difference(sd, p.get("n", 0)) if sd is not None else math.nan
    return d


def det(p: dict) -> str:
    d = detectable(p)
    return "–" if math.isnan(d) else f"±{100 * d:.2f}"


def cell(c: dict, metric: str) -> str:
    return f"{pct(c[metric]['mean'])} ± {pct(c[metric]['std'])}" if metric in c else "–"


# ---------------------------------------------------------------------- verdicts (the only source of conclusions)
def verdict(pair: dict, what: str = "Flat-LoRA", unit: str = "points", scale: float = 100.0) -> str:
    """One sentence from a paired comparison: the sign of the 95 % CI of the mean difference decides.

    Example:
        >>> verdict({"mean_diff": 0.001, "ci_low": -0.002, "ci_high": 0.004, "n": 10, "t_pvalue": 0.5,
        ...          "detectable_diff": 0.0042})
        'no detectable effect (Δ +0.10 points, 95 % CI [-0.20, +0.40], n = 10, t-test p = 0.500; a true Δ of ±0.42 points would have been found with 80 % power)'
    """
    lo, hi, n = pair.get("ci_low"), pair.get("ci_high"), pair.get("n", 0)
    d = pair.get("mean_diff")
    stats = (f"Δ {scale * d:+.2f} {unit}, 95 % CI [{scale * lo:+.2f}, {scale * hi:+.2f}], n = {n}, "
             f"t-test p = {pval(pair.get('t_pvalue'))}") if n >= 2 and not math.isnan(lo) else f"n = {n}"
    if n < 2 or lo is None or math.isnan(lo):
        return f"not enough paired seeds to conclude ({stats})"
    if lo > 0:
        return f"{what} is higher ({stats})"
    if hi < 0:
        return f"{what} is lower ({stats})"
    d = detectable(pair)
    rules_out = "" if math.isnan(d) else f"; a true Δ of ±{scale * d:.2f} {unit} would have been found with 80 % power"
    return f"no detectable effect ({stats}{rules_out})"


def headroom_verdict(lora_mean: float, lo: float = 0.2, hi: float = 0.8) -> tuple[bool, str]:
    """Whether a LoRA baseline leaves room to improve: inside [lo, hi] counts as evidence.

    Example:
        >>> headroom_verdict(0.01)[0], headroom_verdict(0.55)[0]
        (False, True)
    """
    if lo <= lora_mean <= hi:
        return True, f"LoRA's test score {pct(lora_mean)} % is inside the {pct(lo)}–{pct(hi)} % headroom range"
    return False, (f"LoRA's test score {pct(lora_mean)} % is outside the {pct(lo)}–{pct(hi)} % headroom range: "
                   "this task does not count as evidence either way")


def sharpness_word(pair: dict) -> str:
    lo, hi = pair.get("ci_low"), pair.get("ci_high")
    if pair.get("n", 0) < 2 or lo is None or math.isnan(lo):
        return "not enough pairs"
    return "lower (flatter)" if hi < 0 else "higher (sharper)" if lo > 0 else "no detectable difference"


# ---------------------------------------------------------------------- sections
def pair_of(summary: dict, metric: str, rank: int) -> dict | None:
    return next((p for p in summary["pairs"] if p["metric"] == metric and p["rank"] == rank and p["method"] == "flat-lora"
                 and p["baseline"] == "lora"), None)


def cell_of(summary: dict, method: str, rank: int) -> dict | None:
    return next((c for c in summary["cells"] if c["method"] == method and c["rank"] == rank), None)


def headline(studies: dict[str, dict]) -> list[str]:
    lines = ["| study | test metric | r | n | LoRA | Flat-LoRA | Δ points [95 % CI] | detectable Δ (80 % power) | t-test p | Wilcoxon p | d_z | wins/losses | train s/run LoRA → Flat |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in studies.items():
        if "main" not in s:
            continue
        summ, metric = s["main"]["summary"], s["config"]["test_metric"]
        for rank in sorted({c["rank"] for c in summ["cells"]}):
            a, b, p = cell_of(summ, "lora", rank), cell_of(summ, "flat-lora", rank), pair_of(summ, metric, rank)
            if not (a and b and p):
                continue
            lines.append(f"| {name} | {metric} | {rank} | {p['n']} | {cell(a, metric)} | {cell(b, metric)} | "
                         f"{pts(p['mean_diff'])} [{pts(p['ci_low'])}, {pts(p['ci_high'])}] | {det(p)} | "
                         f"{pval(p['t_pvalue'])} | {pval(p['wilcoxon_pvalue'])} | {num(p['effect_size_dz'], 2)} | "
                         f"{p['wins']}/{p['losses']} | {secs(a['train_seconds'])} → {secs(b['train_seconds'])} |")
    return lines


def planned_seeds(cfg: dict) -> int:
    seeds = cfg["stages"]["main"]["seeds"]
    return len(seeds) if isinstance(seeds, list) else int(seeds["count"])


def status(studies: dict[str, dict]) -> list[str]:
    """How complete each study is, from its config and what was measured: a comparison with fewer paired seeds
    than planned is reported, but flagged, and a study never run says so."""
    lines = ["| study | stages with results | main: paired seeds per rank (planned) | status |", "|---|---|---|---|"]
    for name in list(STUDY_ORDER) + [n for n in studies if n not in STUDY_ORDER]:
        s = studies.get(name)
        if s is None:
            lines.append(f"| {name} | – | – | not run yet (`python benchmarks/evidence/study.py {name} --plan`) |")
            continue
        done = [st for st in STAGES if st in s]
        planned = planned_seeds(s["config"])
        ns = {}
        if "main" in s:
            metric = s["config"]["test_metric"]
            for rank in sorted({c["rank"] for c in s["main"]["summary"]["cells"]}):
                p = pair_of(s["main"]["summary"], metric, rank)
                ns[rank] = p["n"] if p else 0
        got = ", ".join(f"r{r}: {n}" for r, n in ns.items()) or "0"
        seeds_ok = bool(ns) and min(ns.values()) >= planned
        # sharpness needs the trained weights on the machine: runs trained elsewhere are missing from it
        n_sharp = len(s["sharpness"]["summary"].get("seeds", [])) if "sharpness" in s else 0
        sharp_ok = "sharpness" not in s["config"]["stages"] or n_sharp >= planned
        word = "complete" if seeds_ok and sharp_ok else (
            f"INCOMPLETE: {min(ns.values()) if ns else 0} of {planned} paired seeds"
            + ("" if sharp_ok else f", sharpness {n_sharp} of {planned}") + "; resume with the same command")
        word += extra_status(s)
        lines.append(f"| {name} | {', '.join(done) or '–'} | {got} ({planned}) | {word} |")
    return lines


def extra_status(s: dict) -> str:
    """The optional ranks, variants and sam stages, when a study ran them: paired seeds done of planned ('' otherwise)."""
    out = []
    planned = lambda st: len(_seeds(s["config"]["stages"].get(st, {}).get("seeds", [])))  # noqa: E731
    if "ranks" in s:
        summ, metric = s["ranks"]["summary"], s["config"]["test_metric"]
        ns = [p["n"] for p in summ["pairs"] if p["metric"] == metric]
        out.append(f"ranks: {min(ns) if ns else 0} of {planned('ranks')} paired seeds per rank")
    if "variants" in s:
        summ, metric = s["variants"]["summary"], s["config"]["test_metric"]
        ns = [p["n"] for p in summ["pairs"] if p["metric"] == metric]
        out.append(f"variants: {min(ns) if ns else 0} of {planned('variants')} paired seeds per pair")
    if "sam" in s:
        summ, metric = s["sam"]["summary"], s["config"]["test_metric"]
        ns = [p["n"] for p in summ["pairs"] if p["metric"] == metric and p["baseline"] == "flat-lora"
              and p["budget"] == "equal_time"]
        waits = [m for m in summ.get("methods", []) if m not in summ.get("timing", {})]
        out.append(f"sam: {min(ns) if ns and not waits else 0} of {planned('sam')} paired seeds at equal wall-clock"
                   + (f" ({', '.join(waits)} waiting for the timing)" if waits else ""))
    return "".join(f"; {x}" for x in out)


def _seeds(v: Any) -> list[int]:
    return list(range(int(v.get("start", 0)), int(v.get("start", 0)) + int(v["count"]))) if isinstance(v, dict) else list(v)


def protocol(name: str, s: dict) -> list[str]:
    cfg, env = s["config"], s["env"]
    spec = cfg["spec"]
    task = env.get("task", {})
    lines = [f"**Task** `{spec['task']}` on `{spec.get('model')}` — {cfg.get('description', '')}.", ""]
    if task.get("sizes"):
        lines.append("**Splits** (sizes): " + ", ".join(f"{k} {v}" for k, v in task["sizes"].items())
                     + (f"; split seed {task['split_seed']}" if "split_seed" in task else "") + ".")
    for key in ("split", "difficulty", "ood_longer", "ood_template", "scoring", "source"):
        if key in task:
            lines.append(f"- {key}: {task[key]}")
    lines.append("")
    lines.append(f"**Base spec** (before the choices below): `{json.dumps(spec, default=str)}`")
    lines.append("")
    lines.append(f"**Choices**, all on `{cfg['dev_metric']}` (the dev split; the test split chooses nothing):")
    borrowed = cfg.get("choices_from") or {}
    if borrowed:
        lines.append(f"- {', '.join(borrowed['stages'])}: the {borrowed['study']} study's choices (its section), "
                     "not chosen again here")
    for stage in ("headroom", "recipe", "sigma"):
        ch = (s.get(stage) or {}).get("choice")
        if stage not in cfg.get("stages", {}):
            continue
        if ch:
            extra = "" if ch.get("has_headroom", True) else " — WARNING: no level inside the headroom range"
            lines.append(f"- {stage}: **{', '.join(f'{k} = {v}' for k, v in ch['chosen'].items())}** "
                         f"(dev {pct(ch['mean'])} %; rule: {ch['rule']}){extra}")
        else:
            lines.append(f"- {stage}: not run to completion (no choice recorded)")
    main = cfg.get("stages", {}).get("main", {})
    if "main" in s:
        seeds = sorted({sd for c in s["main"]["summary"]["cells"] for sd in c["seeds"]})
        lines.append(f"- main: ranks {sorted({c['rank'] for c in s['main']['summary']['cells']})}, seeds {seeds} "
                     f"(fresh seeds, none used for a choice), methods lora and flat-lora, paired by seed "
                     f"(same data order and initial weights)")
    elif main:
        lines.append("- main: not run yet")
    lines.append("")
    dev = env.get("device")
    vers = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "peft", "flatlora", "python") if k in env)
    gpu = next((c.get("gpu") for c in reversed(s["commands"]) if c.get("gpu")), None)
    lines.append(f"**Device** {dev or '–'}" + (f" ({gpu})" if gpu else "") + f"; **versions** {vers or '–'}"
                 + (f"; commit `{env['git_commit'][:10]}`" if env.get("git_commit") else "") + ".")
    if s["commands"]:
        lines += ["", "**Commands** (as run, from commands.jsonl):", "", "```"]
        lines += [" ".join(c["argv"]) + f"    # {c.get('started', '')}" for c in s["commands"]]
        lines.append("```")
    return lines


def grid_table(stage: str, summ: dict, choice: dict | None) -> list[str]:
    metric = summ["metric"]
    keys = list(summ["points"][0]["params"]) if summ["points"] else []
    has_pair = any("vs_lora" in p for p in summ["points"])
    head = "| " + " | ".join(keys) + f" | n | {metric} mean ± std |" + (" Δ vs LoRA [95 % CI] | t-test p |" if has_pair else "") + " train s | |"
    lines = [head, "|" + "---|" * (len(keys) + 3 + (2 if has_pair else 0) + 1)]
    if summ.get("lora_baseline"):
        b = summ["lora_baseline"]
        lines.append("| " + " | ".join("0 (LoRA)" if k == "flat.sigma" else "" for k in keys)
                     + f" | {len(b['seeds'])} | {pct(b['mean'])} ± {pct(b['std'])} |" + (" | |" if has_pair else "") + " | baseline |")
    for p in summ["points"]:
        mark = "**chosen**" if choice and choice["point"] == p["point"] else ("incomplete" if not p["complete"] else "")
        row = "| " + " | ".join(str(p["params"].get(k)) for k in keys) + f" | {p['n']} | {pct(p.get('mean'))} ± {pct(p.get('std'))} |"
        if has_pair:
            v = p.get("vs_lora")
            row += (f" {pts(v['mean_diff'])} [{pts(v['ci_low'])}, {pts(v['ci_high'])}] | {pval(v['t_pvalue'])} |" if v else " – | – |")
        ts = p.get("train_seconds")
        row += f" {ts:.0f} | {mark} |" if ts is not None else f" – | {mark} |"
        lines.append(row)
    return lines


def main_tables(s: dict) -> list[str]:
    summ = s["main"]["summary"]
    metrics = [m for m in summ["metrics"] if not m.endswith("/mcc")]
    lines = ["| method | r | n | " + " | ".join(metrics) + " | train s | eval s | peak MB |",
             "|---|---|---|" + "---|" * len(metrics) + "---|---|---|"]
    peak = summ.get("peak_memory_mb") or {}
    for c in sorted(summ["cells"], key=lambda c: (c["rank"], c["method"] != "lora")):
        key = f"{c['method']}_r{c['rank']}"
        ev = c.get("eval_seconds")
        lines.append(f"| {c['method']} | {c['rank']} | {c['n']} | " + " | ".join(cell(c, m) for m in metrics)
                     + f" | {c['train_seconds']:.1f} | {num(ev, 3)} | {peak.get(key, 'not recorded')} |")
    lines += ["", "Paired over seeds (Flat-LoRA − LoRA, points):", "",
              "| metric | r | n | Δ mean | 95 % CI | detectable Δ (80 % power) | t-test p | Wilcoxon p | d_z | wins/losses |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in summ["pairs"]:
        if p["metric"] in metrics and p["method"] == "flat-lora":
            lines.append(f"| {p['metric']} | {p['rank']} | {p['n']} | {pts(p['mean_diff'])} | [{pts(p['ci_low'])}, {pts(p['ci_high'])}] | "
                         f"{det(p)} | {pval(p['t_pvalue'])} | {pval(p['wilcoxon_pvalue'])} | {num(p['effect_size_dz'], 2)} | "
                         f"{p['wins']}/{p['losses']} |")
    return lines


def _title(method: str) -> str:
    """'flat-dora' -> 'Flat-DoRA' (names as the paper writes them)."""
    names = {"lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "lora-ga": "LoRA-GA", "rslora": "rsLoRA", "lora+": "LoRA+",
             "full": "full FT", "lora-sam": "LoRA-SAM", "sam-w": "SAM-on-W"}
    return "Flat-" + names.get(method[5:], method[5:]) if method.startswith("flat-") else names.get(method, method)


def _metrics_of(s: dict, summ: dict) -> list[str]:
    cfg = s["config"]
    return [m for m in [cfg["test_metric"], *cfg.get("ood_metrics", [])] if m in summ["metrics"]]


def _pair_cols(p: dict) -> str:
    return (f"{pts(p['mean_diff'])} [{pts(p['ci_low'])}, {pts(p['ci_high'])}] | {det(p)} | {pval(p['t_pvalue'])} | "
            f"{pval(p['wilcoxon_pvalue'])} | {num(p['effect_size_dz'], 2)} | {p['wins']}/{p['losses']}")


def variants_table(s: dict) -> list[str]:
    """Each flat-X against X (same seeds, recipe and σ as main), test and out-of-domain metrics, cost next to gain."""
    summ = s["variants"]["summary"]
    seeds = sorted({sd for c in summ["cells"] for sd in c["seeds"]})
    lines = [f"Each Flat- variant against its own method: rank {sorted({c['rank'] for c in summ['cells']})}, seeds {seeds} "
             "(fresh, none of main's), main's recipe and σ (σ chosen for Flat-LoRA, not re-tuned per variant).", "",
             "| pair | metric | r | n | X | Flat-X | Δ points [95 % CI] | detectable Δ (80 % power) | t-test p | Wilcoxon p | d_z | wins/losses | train s/run X → Flat-X |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in summ["pairs"]:
        if p["metric"] not in _metrics_of(s, summ):
            continue
        a, b = cell_of(summ, p["baseline"], p["rank"]), cell_of(summ, p["method"], p["rank"])
        lines.append(f"| {_title(p['method'])} vs {_title(p['baseline'])} | {p['metric']} | {p['rank']} | {p['n']} | "
                     f"{cell(a, p['metric'])} | {cell(b, p['metric'])} | {_pair_cols(p)} | "
                     f"{secs(a['train_seconds'])} → {secs(b['train_seconds'])} |")
    return lines + _per_seed(s["dir"] / "variants" / "runs.csv", summ)


def _per_seed(runs_csv: Path, summ: dict) -> list[str]:
    """Each pair's test metric seed by seed, every seed either side ran (a failed run shows as "failed"): five
    pairs are few, and a mean and std hide a collapsed run."""
    import csv

    if not runs_csv.exists():
        return []
    metric = summ.get("test_metric") or summ["primary_metric"]
    rows = {(r["method"], int(r["rank"]), int(r["seed"])): r for r in csv.DictReader(runs_csv.open())}

    def value(method: str, rank: int, seed: int) -> str:
        r = rows.get((method, rank, seed))
        if r is None:
            return "–"
        return pct(float(r[metric])) if r.get("status") == "done" and r.get(metric) else "failed"

    lines = ["", f"Per seed, {metric} (X / Flat-X):", ""]
    for p in summ["pairs"]:
        if p["metric"] != metric:
            continue
        seeds = sorted({sd for (m, rk, sd) in rows if rk == p["rank"] and m in (p["method"], p["baseline"])})
        vals = [f"{sd}: {value(p['baseline'], p['rank'], sd)} / {value(p['method'], p['rank'], sd)}" for sd in seeds]
        lines.append(f"- {_title(p['method'])} vs {_title(p['baseline'])}, r = {p['rank']}: " + "; ".join(vals))
    return lines


def sam_tables(s: dict) -> list[str]:
    """SAM baselines at equal steps and at equal wall-clock, paired against Flat-LoRA and LoRA of the same seeds."""
    summ = s["sam"]["summary"]
    timing = summ.get("timing", {})
    lines = [f"Rank {summ['rank']}, seeds {summ['seeds']} (fresh, none of main's), main's recipe and σ. "
             f"**Equal wall-clock** means {summ['equal_wall_clock']}.", ""]
    if timing:
        lines += ["| method | train s/run at equal steps (steps) | Flat-LoRA train s/run (reference) | scale | "
                  "steps at equal wall-clock | train s/run there (measured) |", "|---|---|---|---|---|---|"]
        for m, t in timing.items():
            got = next((c for c in summ["cells"] if c["method"] == m and c["budget"] == "equal_time"), None)
            lines.append(f"| {_title(m)} | {secs(t['sam_seconds'])} ({t['sam_steps']:.0f}) | {secs(t['flat_seconds'])} "
                         f"({t['flat_source']}) | {t['scale']:.3f} | {t['max_steps']} | {secs(got['train_seconds']) if got else '–'} |")
        lines += ["", "Seconds per run depend on how many runs share the GPU, so the scale is taken from runs that "
                  "shared it alike, and the step budget it fixes is what equalises time. The last column was measured "
                  "in the call that ran those steps, under that call's load; it is not comparable to the reference.", ""]
    for m in summ.get("methods", []):
        if m not in timing:
            lines += [f"{_title(m)} at equal wall-clock: not run yet (waits for Flat-LoRA's seconds in main and every "
                      "equal-steps seed).", ""]
    metrics = _metrics_of(s, summ)
    lines += ["| method | budget | n | steps | train s/run | " + " | ".join(metrics) + " |",
              "|---|---|---|---|---|" + "---|" * len(metrics)]
    for c in summ["cells"]:
        lines.append(f"| {_title(c['method'])} | {c['budget'].replace('_', ' ')} | {c['n']} | {c['steps']:.0f} | "
                     f"{secs(c['train_seconds'])} | " + " | ".join(cell(c, k) for k in metrics) + " |")
    lines += ["", "Paired over seeds (method − baseline, points; the baselines trained at equal steps):", "",
              "| method | budget | vs | metric | n | Δ points [95 % CI] | detectable Δ (80 % power) | t-test p | Wilcoxon p | d_z | wins/losses |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in summ["pairs"]:
        if p["metric"] in metrics:
            lines.append(f"| {_title(p['method'])} | {p['budget'].replace('_', ' ')} | {_title(p['baseline'])} | {p['metric']} | "
                         f"{p['n']} | {_pair_cols(p)} |")
    return lines


def sharpness_table(summ: dict) -> list[str]:
    lines = [f"Rank {summ['rank']}, seeds {summ['seeds']}; settings {summ['settings']}.", "",
             "| measure | LoRA mean ± std | Flat-LoRA mean ± std | Δ (Flat − LoRA) [95 % CI] | t-test p | Wilcoxon p | d_z | Flat-LoRA is |",
             "|---|---|---|---|---|---|---|---|"]
    for k in summ["measures"]:
        a, b, p = summ["cells"].get("lora", {}).get(k), summ["cells"].get("flat-lora", {}).get(k), summ["pairs"].get(k)
        if not (a and b and p):
            continue
        lines.append(f"| {k} | {num(a['mean'])} ± {num(a['std'], 2)} | {num(b['mean'])} ± {num(b['std'], 2)} | "
                     f"{num(p['mean_diff'])} [{num(p['ci_low'])}, {num(p['ci_high'])}] | {pval(p['t_pvalue'])} | "
                     f"{pval(p['wilcoxon_pvalue'])} | {num(p['effect_size_dz'], 2)} | {sharpness_word(p)} |")
    lines += ["", "Definitions: " + "; ".join(f"`{k}`: {v}" for k, v in summ.get("definitions", {}).items()) + "."]
    again = summ.get("retrained") or []
    if again:
        lines += ["", f"{len(again)} of these models were trained again from their run's config.yaml (same seed; main's "
                  "weights had stayed on another machine; not bit-identical on a GPU), test metric retrained / main: "
                  + "; ".join(f"{m} s{sd} {pct(a)} / {pct(b)}" for m, sd, a, b in again) + "."]
    return lines


def conclusions(name: str, s: dict) -> list[str]:
    cfg = s["config"]
    if "main" not in s:
        return [f"- {name}: the main comparison has not run yet: no conclusion."] + extra_conclusions(name, s)
    summ, metric = s["main"]["summary"], cfg["test_metric"]
    out = []
    headroom_ok = True
    rng = (cfg.get("stages", {}).get("headroom") or {}).get("range")
    if rng:
        lora = [cell_of(summ, "lora", r) for r in sorted({c["rank"] for c in summ["cells"]})]
        means = [c[metric]["mean"] for c in lora if c and metric in c]
        if means:
            ok, text = headroom_verdict(sum(means) / len(means), *rng)
            headroom_ok = ok
            out.append(f"- {name}: {text}.")
    for rank in sorted({c["rank"] for c in summ["cells"]}):
        p = pair_of(summ, metric, rank)
        if p:
            v = verdict(p)
            out.append(f"- {name}, r = {rank}, {metric}: {v}" + ("" if headroom_ok else " — not counted (no headroom)") + ".")
    ood = list(dict.fromkeys(cfg.get("ood_metrics", []) + [x for x in summ["metrics"] if x.startswith("ood_")
                                                             and x.endswith("exact_match")]))
    for m in ood:
        for rank in sorted({c["rank"] for c in summ["cells"]}):
            p = pair_of(summ, m, rank)
            if p:
                out.append(f"- {name}, r = {rank}, {m} (out of domain): {verdict(p)}.")
    if "sharpness" in s:
        sh = s["sharpness"]["summary"]
        words = [f"{k}: {sharpness_word(sh['pairs'][k])}" for k in sh["measures"] if k in sh["pairs"] and k != "base_loss"]
        if words:
            out.append(f"- {name}, sharpness of the merged weights (Flat-LoRA vs LoRA, r = {sh['rank']}, "
                       f"{len(sh['seeds'])} pairs): " + "; ".join(words) + ".")
    return out + extra_conclusions(name, s)


def extra_conclusions(name: str, s: dict) -> list[str]:
    """The optional stages: each Flat- variant against its method; each SAM method (equal steps, equal wall-clock)
    against Flat-LoRA and LoRA, on the test metric (their out-of-domain rows are in the tables)."""
    out, metric = [], s["config"]["test_metric"]
    if "variants" in s:
        for p in s["variants"]["summary"]["pairs"]:
            if p["metric"] == metric:
                out.append(f"- {name}, {_title(p['method'])} vs {_title(p['baseline'])}, r = {p['rank']}, {metric}: "
                           f"{verdict(p, what=_title(p['method']))}.")
    if "sam" in s:
        ss = s["sam"]["summary"]
        for p in ss["pairs"]:
            if p["metric"] == metric and p["method"] != "flat-lora":
                out.append(f"- {name}, {_title(p['method'])} at {p['budget'].replace('_', ' ')} vs {_title(p['baseline'])}, "
                           f"r = {ss['rank']}, {metric}: {verdict(p, what=_title(p['method']))}.")
    if "humaneval" in s:
        out.append(f"- {name}, HumanEval pass@1: {humaneval_lines(s['humaneval'])[1]}.")
    return out


def humaneval_lines(he: dict) -> tuple[list[str], str]:
    """The out-of-domain code check (humaneval_check.py): its table, and the conclusion it allows. The check counts
    only where the base model passes some problems; trained models' rows, where present, are listed with it."""
    prov = he["provenance"]
    lines = [f"HumanEval pass@1 ({prov.get('decoding', '')}), completions run with the problems' tests in the "
             f"sandbox; {prov.get('device', '')}, {prov.get('date', '')}: `{prov.get('command', '')}`.", "",
             "| model | adapter | pass@1 | passed |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['adapter'] or '(base)'} | {pct(r['pass@1'])} % | {r['passed']} / {r['problems']} |"
              for r in he["rows"]]
    base = next(r for r in he["rows"] if r["adapter"] is None)
    if base["passed"] == 0:
        verdict_ = (f"the base model passes none of {base['problems']} problems, so the code check (which counts only "
                    f"above zero) does not apply to this task and the trained models are not scored")
    elif len(he["rows"]) > 1:
        verdict_ = f"the base model passes {base['passed']} of {base['problems']}; the trained models' rows are above"
    else:
        verdict_ = (f"the base model passes {base['passed']} of {base['problems']}, so the check applies; the trained "
                    f"models are not scored yet")
    return lines + ["", verdict_[0].upper() + verdict_[1:] + "."], verdict_


# ---------------------------------------------------------------------- figures
def sigma_figure(studies: dict[str, dict], path: Path) -> Path | None:
    have = {n: s for n, s in studies.items() if "sigma" in s and s["sigma"]["summary"]["points"]}
    if not have:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(have), figsize=(4.2 * len(have), 3.4), squeeze=False)
    for ax, (name, s) in zip(axes[0], have.items()):
        summ = s["sigma"]["summary"]
        pts_ = [p for p in summ["points"] if "mean" in p]
        xs = [p["params"].get("flat.sigma") for p in pts_]
        ax.errorbar(xs, [100 * p["mean"] for p in pts_], yerr=[100 * p.get("std", 0) for p in pts_], fmt="o-",
                    capsize=3, label="Flat-LoRA")
        if summ.get("lora_baseline"):
            b = summ["lora_baseline"]
            ax.axhline(100 * b["mean"], color="k", ls="--", lw=1, label="LoRA (σ = 0)")
            ax.axhspan(100 * (b["mean"] - b["std"]), 100 * (b["mean"] + b["std"]), color="k", alpha=0.08)
        ch = s["sigma"].get("choice")
        if ch:
            ax.plot([ch["chosen"]["flat.sigma"]], [100 * ch["mean"]], "r*", ms=12, label="chosen")
        ax.set_xscale("log")
        ax.set_xlabel("σ")
        ax.set_ylabel(f"{summ['metric']} (%)")
        ax.set_title(f"{name}: σ on dev ({len(summ['seeds'])} seeds)", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def rank_figure(studies: dict[str, dict], path: Path) -> Path | None:
    have = {}
    for n, s in studies.items():
        cells = []
        for stage in ("main", "ranks"):
            if stage in s:
                cells += s[stage]["summary"]["cells"]
        if cells:
            have[n] = (s, cells)
    if not have:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(have), figsize=(4.2 * len(have), 3.4), squeeze=False)
    for ax, (name, (s, cells)) in zip(axes[0], have.items()):
        metric = s["config"]["test_metric"]
        for method, color in (("lora", "C0"), ("flat-lora", "C1")):
            cs = sorted((c for c in cells if c["method"] == method and metric in c), key=lambda c: c["rank"])
            by_rank = {}
            for c in cs:  # main and ranks may both hold a rank: keep the one with more seeds
                if c["rank"] not in by_rank or c["n"] > by_rank[c["rank"]]["n"]:
                    by_rank[c["rank"]] = c
            cs = [by_rank[r] for r in sorted(by_rank)]
            if cs:
                ax.errorbar([c["rank"] for c in cs], [100 * c[metric]["mean"] for c in cs],
                            yerr=[100 * c[metric]["std"] for c in cs], fmt="o-", color=color, capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(f"{name}: test vs rank (mean ± std)", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------- the document
def render(results: Path, out: Path, figures: bool = True) -> str:
    studies = load_results(results)
    rel = lambda p: str(Path(p).resolve().relative_to(out.parent.resolve())) if str(Path(p).resolve()).startswith(str(out.parent.resolve())) else str(p)  # noqa: E731
    lines = ["# Results: Flat-LoRA vs LoRA, with tuned baselines and paired statistics", "",
             f"Generated by `python benchmarks/evidence/report.py` from `{rel(results)}/` (raw runs.csv and summary.json of "
             "every stage are there). Do not edit by hand: re-run the commands below and regenerate.", ""]
    if not studies:
        lines += ["No study results found yet: run `python benchmarks/evidence/study.py text image llm --plan`, then the studies."]
        text = "\n".join(lines) + "\n"
        out.write_text(text)
        return text
    lines += ["## Status", ""] + status(studies) + [""]
    lines += ["## Headline (test split, chosen recipe and σ)", ""] + headline(studies) + [""]
    lines += ["## Conclusions", "", "The rule: a difference counts only when the 95 % CI of the mean paired difference "
              "excludes 0; otherwise it is reported as no detectable effect, with the true Δ that the same number of "
              "pairs would have found with 80 % power at the observed spread of the differences (two-sided paired t-test, "
              "α = 0.05, noncentral t): effects that large are unlikely to have been missed, smaller ones may have "
              "been. The paper's gains are +0.4 to +1.1 points. The LLM task counts only if LoRA's test score "
              "lies inside its headroom range. Several ranks and metrics are tested; no correction for multiple "
              "comparisons is applied, so a single p near 0.05 is weak evidence.", ""]
    for name, s in studies.items():
        lines += conclusions(name, s)
    lines.append("")
    if figures:
        figs = []
        for fn, fname, caption in ((sigma_figure, "sigma_curves.png", "σ sweeps on dev (mean ± std over the tuning seeds; "
                                    "dashed: LoRA of the chosen recipe)"),
                                   (rank_figure, "rank_curves.png", "test metric against rank (mean ± std over seeds)")):
            try:
                p = fn(studies, results / fname)
            except ImportError:
                p = None
            if p:
                figs.append(f"![{caption}]({rel(p)})\n\n*{caption}*")
        if figs:
            lines += ["## Figures", ""] + [x + "\n" for x in figs]
    for name, s in studies.items():
        lines += [f"## Study `{name}`", "", "### Protocol", ""] + protocol(name, s) + [""]
        for stage, title in (("headroom", "Headroom (difficulty level, LoRA, dev)"), ("recipe", "LoRA recipe (dev)"),
                             ("sigma", "Flat-LoRA σ (dev, chosen recipe)")):
            if stage in s:
                lines += [f"### {title}", ""] + grid_table(stage, s[stage]["summary"], s[stage]["choice"]) + [""]
        if "main" in s:
            lines += ["### Main comparison (test and out-of-domain splits; dev shown for reference)", ""] + main_tables(s) + [""]
        if "ranks" in s:
            lines += ["### Ranks", ""]
            summ = s["ranks"]["summary"]
            metric = s["config"]["test_metric"]
            lines += ["| r | n | LoRA | Flat-LoRA | Δ [95 % CI] | t-test p |", "|---|---|---|---|---|---|"]
            for r in sorted({c["rank"] for c in summ["cells"]}):
                a, b, p = cell_of(summ, "lora", r), cell_of(summ, "flat-lora", r), pair_of(summ, metric, r)
                if a and b and p:
                    lines.append(f"| {r} | {p['n']} | {cell(a, metric)} | {cell(b, metric)} | {pts(p['mean_diff'])} "
                                 f"[{pts(p['ci_low'])}, {pts(p['ci_high'])}] | {pval(p['t_pvalue'])} |")
            lines.append("")
        if "variants" in s:
            lines += ["### Flat- variants against their methods (test and out-of-domain)", ""] + variants_table(s) + [""]
        if "sam" in s:
            lines += ["### SAM baselines at equal steps and at equal wall-clock", ""] + sam_tables(s) + [""]
        if "sharpness" in s:
            lines += ["### Sharpness of the merged weights (paired across seeds)", ""] + sharpness_table(s["sharpness"]["summary"]) + [""]
        if "humaneval" in s:
            lines += ["### HumanEval (out-of-domain code check)", ""] + humaneval_lines(s["humaneval"])[0] + [""]
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(DEFAULT_RESULTS), help="the evidence results root")
    ap.add_argument("--out", default=str(ROOT / "RESULTS.md"), help="the markdown file to write")
    ap.add_argument("--no-figures", action="store_true")
    args = ap.parse_args(argv)
    render(Path(args.results), Path(args.out), figures=not args.no_figures)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
