"""`compare`: methods × ranks × seeds of one spec, resumable, run N at a time, then the statistics, table and plot.

    out_dir/spec.yaml                   the spec of the last comparison call
    out_dir/runs/<method>_r<r>_s<seed>/ one results folder per run (see runner.py)
    out_dir/summary.{md,json} runs.csv pairs.csv plot.png   over every finished run in out_dir/runs

Resuming: a run whose folder holds metrics.json is finished and is read, never redone or overwritten
(a diverged run is finished too: it is saved as failed with its reason); a run interrupted midway left
only `<name>.partial/` and starts over. Every finished run in out_dir must have been made under the same
config and on the same data and split (fingerprints, see provenance.py): otherwise the comparison stops
before training, naming the run and the difference, instead of mixing them in one table.

Parallel runs (`jobs > 1`, `flatlora compare --jobs N`): N worker processes (spawn, so the parent never
initialises CUDA for them and each sets its own threads: train.threads, else cores / N) train N runs at
once on one device; each builds the task once and checks its fingerprint against the parent's. A run
depends only on (spec, method, rank, seed), not on the process it trains in, so `--jobs 1` and
`--jobs 2` give identical runs. One progress line per job. A run that raises is reported (traceback in
`<name>.partial/error.txt`) and the grid goes on; the next call retries it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import traceback
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .methods import LAYER_CHECKED, check_targets, get_method
from .provenance import diff_inputs, task_inputs
from .quant import check_quantization
from .results import plot_summary, summarize, write_summary, to_markdown
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
    errors: list[dict] = field(default_factory=list)  # runs that raised: {"run", "error"}; retried by the next call

    @property
    def failed(self) -> list[dict]:
        """Runs saved as failed (diverged), with their reason."""
        return self.summary["failed"]


def run_name(method: str, rank: int, seed: int) -> str:
    return f"{method}_r{rank}_s{seed}"


def grid(spec: ExperimentSpec) -> list[tuple[str, int, int]]:
    """(method, rank, seed) in run order: seed-major, so an interrupted compare already holds complete pairs."""
    ranks = spec.ranks or [spec.lora.r]
    return [(m, r, s) for s in spec.seeds for r in ranks for m in spec.methods]


def check_layer_kinds(spec: ExperimentSpec, task, methods: list[str] | None = None) -> None:
    """Methods that cannot work on some layers (PiSSA, LoRA-GA: PEFT initialises Linear layers only; DoRA: no
    zero-norm filter) against the layers lora.targets selects in the task's model, before any run trains: one
    line naming the layers and the fix. Builds the bare model once (on CPU), only when such a method is in
    `methods` (default spec.methods)."""
    methods = [get_method(m) for m in dict.fromkeys(methods if methods is not None else spec.methods)]
    restricted = [m for m in methods if m.adapter in LAYER_CHECKED]
    if not restricted:
        return
    model = task.build_model()  # sets the task's default targets, which can depend on the model
    targets = spec.lora.targets if spec.lora.targets is not None else getattr(task, "default_targets", None)
    for m in restricted:
        check_targets(m, model, targets)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} (finished run) vs {b!r} (now)"]


def load_finished(runs: Path, spec: ExperimentSpec) -> dict[str, dict]:
    """Every finished run in `runs` (folder name -> record); a run made under another config stops here."""
    now = json.loads(json.dumps(run_key(spec), default=str))
    out = {}
    for f in sorted(runs.glob("*/metrics.json")) if runs.is_dir() else []:
        record = json.loads(f.read_text())
        diff = _diff(record.get("run_key"), now)
        if diff:
            raise ValueError(f"{f.parent} was made with a different config ({'; '.join(diff[:3])}). Finished results "
                             "are never overwritten: choose another out_dir, or restore the config.")
        out[f.parent.name] = record
    return out


def check_inputs(finished: dict[str, dict], inputs: dict, log: Callable[[str], None]) -> None:
    """Finished runs must have seen the data and split that the task holds now."""
    unknown = []
    for name, record in finished.items():
        if "inputs" not in record:
            unknown.append(name)
            continue
        diff = diff_inputs(record["inputs"], inputs)
        if diff:
            raise ValueError(f"runs/{name} was made on different data ({'; '.join(diff[:3])}). Runs on different "
                             "data are never paired: restore the data, or choose another out_dir.")
    if unknown:
        log(f"warning: {len(unknown)} finished run(s) record no data fingerprint (made by an older flatlora), so their "
            f"data cannot be checked: {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}")


def compare(spec: ExperimentSpec, *, jobs: int | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> CompareResult:
    """Run (or resume) the grid of `spec`, `jobs` runs at a time (default spec.jobs), write the summary files
    over every finished run in out_dir, and return them."""
    jobs = spec.jobs if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    out = Path(spec.out_dir)
    runs = out / "runs"
    cells = grid(spec)
    # Validate everything a run needs before the first one trains: finished runs in out_dir match this
    # spec, the task builds (data, labels, model reference), its data and split match the finished runs.
    finished = load_finished(runs, spec)
    from .runner import resolve_device

    resolve_device(spec.train.device)  # `cuda` without CUDA fails here, not in every run
    task = create_task(spec.task, model=spec.model, **spec.task_args)
    check_quantization(spec, task)
    check_layer_kinds(spec, task)
    inputs = task_inputs(spec.task, spec.task_args, task)
    check_inputs(finished, inputs, log)
    runs.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(f"# flatlora compare {out / 'spec.yaml'}  (resumes this comparison)\n"
                                   + yaml.safe_dump(spec.to_dict(), sort_keys=False))
    todo = [c for c in cells if run_name(*c) not in finished]
    for i, c in enumerate(cells, 1):
        if run_name(*c) in finished:
            log(f"[{i}/{len(cells)}] {run_name(*c)}: finished before, kept" + _status(finished[run_name(*c)]))
    if todo and jobs > 1:
        log(f"{len(todo)} runs, {min(jobs, len(todo))} at a time")
    new, errors = (_run_parallel if jobs > 1 and len(todo) > 1 else _run_serial)(
        spec, todo, runs, task, inputs, min(jobs, len(todo)), progress, log)
    records = [r for _, r in sorted({**finished, **new}.items(), key=lambda kv: _order(kv[1], cells))]
    summary = summarize(records, baseline=spec.baseline, errors=errors)
    title, note = _title(spec, task, records, cells)
    write_summary(out, records, summary, title, note)
    md = to_markdown(summary, title, note)
    plot = None
    if spec.plot and any(c["n"] for c in summary["cells"]):
        try:
            plot = plot_summary(records, summary, out / "plot.png")
            from ..analysis.plot import plot_training_curves  # loss and σ against step, mean over seeds

            plot_training_curves([runs / run_name(*c) for c in cells], out / "curves.png", title=title)
        except ImportError:
            log("matplotlib is not installed: no plot (pip install 'flatlora[plot]')")
    return CompareResult(records, summary, md, out, len(new), len(cells) - len(todo), plot, errors)


def _status(record: dict) -> str:
    if record.get("status", "done") != "done":
        return f" (failed: {record.get('failure')})"
    pm = record["primary_metric"]
    return f"  {pm} = {100 * record['metrics'][pm]:.2f}" if pm in record["metrics"] else ""


def _order(record: dict, cells: list[tuple[str, int, int]]) -> tuple:
    """Grid order for this call's runs, then the folder's other finished runs (by rank, seed, method)."""
    c = (record["method"], record["rank"], record["seed"])
    return (0, cells.index(c), "") if c in cells else (1, record["rank"] * 10**6 + record["seed"], record["method"])


def _title(spec: ExperimentSpec, task, records: list[dict], cells: list) -> tuple[str, str]:
    seeds = sorted({r["seed"] for r in records})
    title = f"{spec.task} · {task.describe().get('model', spec.model)} · {len(seeds)} seeds"
    extra = [r for r in records if (r["method"], r["rank"], r["seed"]) not in cells]
    note = ""
    if extra:
        note = (f"This summary covers all {len(records)} finished runs in {spec.out_dir}/runs (seeds {seeds}); "
                f"{len(extra)} of them are outside this call's grid (methods {spec.methods}, ranks "
                f"{spec.ranks or [spec.lora.r]}, seeds {spec.seeds}).")
    return title, note


def _log_ran(log, i: int, n: int, name: str, record: dict, worker: str = "") -> None:
    log(f"[{i}/{n}] {name}:{_status(record)}  ({record['train_seconds']:.0f} s train){worker}")


def _error(runs: Path, name: str, exc: BaseException | str, log) -> dict:
    text = exc if isinstance(exc, str) else "".join(traceback.format_exception(exc))
    summary = text.strip().splitlines()[-1]
    partial = runs / f"{name}.partial"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "error.txt").write_text(text)
    log(f"{name}: ERROR {summary} (traceback in {partial / 'error.txt'}); the grid goes on")
    return {"run": name, "error": summary}


# ---------------------------------------------------------------------- one at a time
def _run_serial(spec, todo, runs, task, inputs, jobs, progress, log):
    new, errors = {}, []
    for i, (method, rank, seed) in enumerate(todo, 1):
        name = run_name(method, rank, seed)
        try:
            rec = run_one(spec, runs / name, method=method, seed=seed, rank=rank, task=task, inputs=inputs, progress=progress)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001  (recorded with its traceback; the other runs still train)
            errors.append(_error(runs, name, e, log))
            continue
        new[name] = rec
        _log_ran(log, i, len(todo), name, rec)
    return new, errors


# ---------------------------------------------------------------------- N at a time
def _run_parallel(spec, todo, runs, task, inputs, jobs, progress, log):
    """Runs `todo` in `jobs` spawned workers, at most `jobs` in flight, so a worker that dies (killed, out of
    memory) costs the runs in flight only: a fresh pool takes the rest."""
    new, errors, queue, done = {}, [], list(todo), 0
    threads = spec.train.threads or max(1, cores() // jobs)
    ctx = multiprocessing.get_context("spawn")
    while queue:
        slots = ctx.Queue()
        for s in range(jobs):
            slots.put(s)
        # Only filters on built-in warning classes travel: a class of a module the worker cannot import
        # would break every worker at start-up.
        filters = [f for f in warnings.filters if getattr(f[2], "__module__", "") == "builtins"]
        init = (slots, threads, filters, logging.getLogger().level)
        ex = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=init)
        in_flight: dict = {}
        try:
            while queue or in_flight:
                while queue and len(in_flight) < jobs:
                    method, rank, seed = cell = queue.pop(0)
                    name = run_name(*cell)
                    in_flight[ex.submit(_work, spec, str(runs / name), method, seed, rank, inputs, progress)] = name
                finished_now, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for fut in finished_now:
                    name = in_flight.pop(fut)
                    done += 1
                    try:
                        kind, payload, worker = fut.result()
                    except BrokenProcessPool:
                        kind, payload, worker = "error", "a worker process died (killed? out of memory?) while this " \
                                                         "run was in flight", ""
                    if kind == "ok":
                        new[name] = payload
                        _log_ran(log, done, len(todo), name, payload, worker)
                    else:
                        errors.append(_error(runs, name, payload, log))
        except BrokenProcessPool:  # submit() on a broken pool: the in-flight runs are lost, the rest go on
            for name in in_flight.values():
                errors.append(_error(runs, name, "a worker process died while this run was in flight", log))
            in_flight.clear()
        except BaseException:
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown(wait=True)
    return new, errors


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_WORKER: dict[str, Any] = {}


def _init_worker(slots, threads: int, filters: list, level: int) -> None:
    """A spawned worker: its progress line, its thread count, the parent's warning filters and log level."""
    import torch

    _WORKER["slot"] = slots.get()
    torch.set_num_threads(threads)
    warnings.filters[:] = filters
    logging.basicConfig(level=level, format="%(message)s")


def _work(spec: ExperimentSpec, run_dir: str, method: str, seed: int, rank: int, expected: dict, progress: bool):
    """One run in a worker: ("ok", record, tag) or ("error", traceback text, tag); never raises."""
    tag = f"  [job {_WORKER.get('slot', 0) + 1}]"
    try:
        key = json.dumps([spec.task, spec.model, spec.task_args], sort_keys=True, default=str)
        if _WORKER.get("task_key") != key:  # the task is built once per worker (same spec -> same split)
            task = create_task(spec.task, model=spec.model, **spec.task_args)
            inputs = task_inputs(spec.task, spec.task_args, task)
            diff = diff_inputs(expected, inputs)
            if diff:
                raise ValueError(f"the data changed while the comparison ran ({'; '.join(diff[:3])}): not pairing")
            _WORKER.update(task_key=key, task=task, inputs=inputs)
        rec = run_one(spec, run_dir, method=method, seed=seed, rank=rank, task=_WORKER["task"],
                      inputs=_WORKER["inputs"], progress=progress, position=_WORKER.get("slot", 0))
        return "ok", rec, tag
    except Exception:  # noqa: BLE001  (the parent records it; the worker stays up for the next run)
        return "error", traceback.format_exc(), tag
