"""`compare`: methods × ranks × seeds of one spec, resumable, then the statistics, table and plot.

    out_dir/spec.yaml                   the spec of the comparison
    out_dir/runs/<method>_r<r>_s<seed>/ one results folder per run (see runner.py)
    out_dir/summary.{md,json} runs.csv pairs.csv plot.png

Resuming: a run whose folder holds metrics.json is finished and is read, never redone or overwritten;
a run interrupted midway left only `<name>.partial/` and starts over. Finished runs made under a
different spec (another lr, task option, ...) stop the comparison with the difference named, instead
of being mixed into one table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .results import plot_summary, summarize, to_markdown, write_summary
from .runner import run_key, run_one
from .spec import ExperimentSpec
from .tasks import create_task


@dataclass
class CompareResult:
    records: list[dict]
    summary: dict[str, Any]
    markdown: str
    out_dir: Path
    ran: int
    skipped: int
    plot: Path | None = None


def run_name(method: str, rank: int, seed: int) -> str:
    return f"{method}_r{rank}_s{seed}"


def grid(spec: ExperimentSpec) -> list[tuple[str, int, int]]:
    """(method, rank, seed) in run order: seed-major, so an interrupted compare already holds complete pairs."""
    ranks = spec.ranks or [spec.lora.r]
    return [(m, r, s) for s in spec.seeds for r in ranks for m in spec.methods]


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} (finished run) vs {b!r} (now)"]


def load_finished(run_dir: Path, spec: ExperimentSpec) -> dict | None:
    f = run_dir / "metrics.json"
    if not f.exists():
        return None
    record = json.loads(f.read_text())
    diff = _diff(record.get("run_key"), json.loads(json.dumps(run_key(spec), default=str)))
    if diff:
        raise ValueError(f"{run_dir} was made with a different config ({'; '.join(diff[:3])}). "
                         "Finished results are never overwritten: choose another out_dir, or restore the config.")
    return record


def compare(spec: ExperimentSpec, *, progress: bool = True, log: Callable[[str], None] = print) -> CompareResult:
    """Run (or resume) the grid of `spec`, write the summary files and return them."""
    out = Path(spec.out_dir)
    runs = out / "runs"
    cells = grid(spec)
    # Validate everything a run needs before the first one trains: the task builds (data, labels, model
    # reference), and finished runs in out_dir match this spec.
    finished = {name: load_finished(runs / name, spec) for name in (run_name(*c) for c in cells)}
    task = create_task(spec.task, model=spec.model, **spec.task_args)
    runs.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(f"# flatlora compare {out / 'spec.yaml'}  (resumes this comparison)\n"
                                   + yaml.safe_dump(spec.to_dict(), sort_keys=False))
    records, ran, skipped = [], 0, 0
    for i, (method, rank, seed) in enumerate(cells, 1):
        name = run_name(method, rank, seed)
        rec = finished[name]
        if rec is not None:
            skipped += 1
            log(f"[{i}/{len(cells)}] {name}: finished before, kept")
        else:
            rec = run_one(spec, runs / name, method=method, seed=seed, rank=rank, task=task, progress=progress)
            ran += 1
            pm = rec["primary_metric"]
            log(f"[{i}/{len(cells)}] {name}: {pm} = {100 * rec['metrics'][pm]:.2f}  ({rec['train_seconds']:.0f} s train)")
        records.append(rec)
    summary = summarize(records, baseline=spec.baseline)
    title = f"{spec.task} · {task.describe().get('model', spec.model)} · {len(spec.seeds)} seeds"
    write_summary(out, records, summary, title)
    md = to_markdown(summary, title)
    plot = None
    if spec.plot:
        try:
            plot = plot_summary(records, summary, out / "plot.png")
            from ..analysis.plot import plot_training_curves  # loss and σ against step, mean over seeds

            plot_training_curves([runs / run_name(*c) for c in cells], out / "curves.png", title=title)
        except ImportError:
            log("matplotlib is not installed: no plot (pip install 'flatlora[plot]')")
    return CompareResult(records, summary, md, out, ran, skipped, plot)
