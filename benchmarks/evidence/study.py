"""The evidence study of issue 11: does Flat-LoRA beat a tuned LoRA, by how much, and how sure are we.

    python benchmarks/evidence/study.py text image llm --plan              what would run, and how long (H200 estimates)
    python benchmarks/evidence/study.py text --jobs 8 --budget-s 540       run (or resume) every stage of a study
    python benchmarks/evidence/study.py llm --stages headroom,recipe --jobs 8
    python benchmarks/evidence/study.py llm --tiny --out /tmp/ev            CPU smoke run on tiny models (tests)

A study (benchmarks/evidence/study_<name>.yaml) is a base ExperimentSpec plus stages, run in this order, each one
`flatlora compare --jobs N` per grid point, all on the DEV split until the last:

    headroom   (LLM only) LoRA at each task difficulty level, 1 seed: the level whose dev exact match is
               inside [lo, hi] (default 20-80 %) and closest to the middle is kept for every later stage
    recipe     LoRA over a small lr x epochs grid, 2 seeds, rank 8: the best mean dev metric is the recipe
    sigma      Flat-LoRA with that recipe over a sigma grid, the same seeds: the best mean dev metric is sigma
    main       LoRA vs Flat-LoRA on TEST, ranks 8 and 16, >= 10 paired seeds (5 for the LLM), chosen recipe
               and sigma; fresh seeds (100, 101, ...) so no tuning run is reused
    sharpness  sharpness of the merged weights of main's rank-8 runs (flatlora.analysis): expected loss
               increase under the filter noise and the top Hessian eigenvalue, paired across seeds
    ranks      (optional, only when named in --stages) LoRA vs Flat-LoRA over more ranks at fixed alpha
    variants   (optional) each pair of the config, e.g. DoRA vs Flat-DoRA and PiSSA vs Flat-PiSSA, on TEST at one
               rank, the chosen recipe and sigma, its own fresh seeds (none of main's)
    sam        (optional) LoRA-SAM (SAM on A, B) and SAM on W against LoRA and Flat-LoRA, own fresh seeds. First at
               equal steps (the chosen recipe; these runs also measure each SAM method's training seconds), then at
               equal wall-clock: each SAM method gets train.max_steps = its equal-steps steps x (Flat-LoRA's
               training seconds per run in main, same rank) / (its own training seconds per run at equal steps).
               The budget is computed once, when both measurements exist, and frozen in sam/timing.json.

Each stage writes benchmarks/results/evidence/<study>/<stage>/: the compare folders (one per grid point;
runs/<method>_r<r>_s<seed>/ inside), runs.csv and summary.json over all of them, and choice.json for
the stages that choose something. Everything resumes: a finished run is never redone, a stage whose
runs are all finished only re-writes its summary. `--budget-s` stops launching compare calls whose
estimated time no longer fits and stops a running one at the deadline (its finished runs are kept; the
interrupted ones start over next time). Nothing is ever chosen on a test metric: the choice functions
read only `dev_metric` and refuse a metric that does not start with 'dev/'.
"""

from __future__ import annotations

import argparse
import copy
import csv
import gzip
import io
import json
import math
import os
import signal
import subprocess
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).resolve().parent  # study_<name>.yaml live here: every configs/*.yaml must be an ExperimentSpec
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "evidence"
STAGES = ("headroom", "recipe", "sigma", "main", "sharpness", "ranks", "variants", "sam")
OPTIONAL = ("ranks", "variants", "sam")  # run only when named in --stages
SAM_TIME_TOLERANCE = 0.25  # main's Flat-LoRA seconds may set SAM's budget only within this of the stage's own
COMPARISONS = ("main", "ranks", "variants")  # stages summarised as flatlora compare does (each flat-X vs X)


# ---------------------------------------------------------------------- study configuration
def load_study(name_or_path: str, tiny: bool = False) -> dict[str, Any]:
    """The study config (benchmarks/evidence/study_<name>.yaml or a path), with its `tiny:` overrides merged when tiny."""
    import yaml

    p = Path(name_or_path)
    if not p.suffix:
        p = CONFIGS / f"study_{name_or_path}.yaml"
    if not p.is_file():
        known = sorted(q.stem[len("study_"):] for q in CONFIGS.glob("study_*.yaml"))
        raise SystemExit(f"study {name_or_path!r}: no {p}; known studies: {', '.join(known)}")
    cfg = yaml.safe_load(p.read_text()) or {}
    for key in ("study", "spec", "dev_metric", "test_metric", "stages"):
        if key not in cfg:
            raise SystemExit(f"{p}: missing key {key!r}")
    if not str(cfg["dev_metric"]).startswith("dev/"):
        raise SystemExit(f"{p}: dev_metric must be a dev-split metric ('dev/...'), got {cfg['dev_metric']!r}: "
                         "nothing is chosen on test")
    unknown = sorted(set(cfg["stages"]) - set(STAGES))
    if unknown:
        raise SystemExit(f"{p}: unknown stage(s) {unknown}; stages are {list(STAGES)}")
    src = cfg.get("choices_from")
    if src is not None:
        bad = sorted(set(src.get("stages") or []) - {"headroom", "recipe", "sigma"}) if isinstance(src, dict) else None
        if not isinstance(src, dict) or not src.get("study") or bad or not src.get("stages"):
            raise SystemExit(f"{p}: choices_from must be {{study: NAME, stages: [...]}} with stages among headroom, recipe, "
                             f"sigma, got {src!r}")
        both = sorted(set(src["stages"]) & set(cfg["stages"]))
        if both:
            raise SystemExit(f"{p}: stage(s) {both} both run here and borrowed from {src['study']}: drop one")
    if tiny:
        t = cfg.get("tiny")
        if not t:
            raise SystemExit(f"{p}: no `tiny:` section, so --tiny cannot run this study")
        cfg = merge(cfg, {k: v for k, v in t.items() if k != "stages"})
        for stage, over in (t.get("stages") or {}).items():
            cfg["stages"][stage] = merge(cfg["stages"].get(stage, {}), over)
    check_extra_stages(cfg, p)
    cfg["config_path"] = str(p)
    return cfg


def check_extra_stages(cfg: dict, where: Any) -> None:
    """The optional variants/sam stages: known methods, X vs flat-X pairs, and seeds that main does not use."""
    from flatlora.experiments.methods import get_method, list_methods

    main_seeds = set(seed_list((cfg["stages"].get("main") or {}).get("seeds", [])))
    for stage in ("variants", "sam"):
        sc = cfg["stages"].get(stage)
        if sc is None:
            continue
        if "seeds" not in sc:
            raise SystemExit(f"{where}: stages.{stage} needs seeds, e.g. {{start: 200, count: 5}}")
        reused = sorted(set(seed_list(sc["seeds"])) & main_seeds)
        if reused:
            raise SystemExit(f"{where}: stages.{stage} reuses main's seeds {reused}: give it fresh ones (e.g. start: 200)")
        names = [m for pair in sc.get("pairs", []) for m in pair] if stage == "variants" else list(sc.get("methods", []))
        if not names:
            raise SystemExit(f"{where}: stages.{stage} needs " + ("pairs, e.g. [[dora, flat-dora], [pissa, flat-pissa]]"
                                                                  if stage == "variants" else "methods, e.g. [lora-sam, sam-w]"))
        for m in names:
            if m not in list_methods():
                raise SystemExit(f"{where}: stages.{stage}: unknown method {m!r}; methods are {', '.join(list_methods())}")
        if stage == "variants":
            for pair in sc["pairs"]:
                if len(pair) != 2 or not get_method(pair[1]).flat or pair[1] != f"flat-{pair[0]}":
                    raise SystemExit(f"{where}: stages.variants pair {pair}: each pair is [X, flat-X], e.g. [dora, flat-dora]")
        else:
            for m in names:
                if not get_method(m).sam:
                    raise SystemExit(f"{where}: stages.sam methods are SAM baselines (lora-sam, sam-w), got {m!r}")
            if sc.get("time_reference", "main") not in ("main", "stage"):
                raise SystemExit(f"{where}: stages.sam.time_reference is main (Flat-LoRA's runs in main) or stage "
                                 f"(Flat-LoRA's equal-steps runs of this stage), got {sc['time_reference']!r}")


def check_variant_layers(study: "Study") -> None:
    """Variants that cannot work on some layers (PiSSA, LoRA-GA: Linear layers only; DoRA: no zero-norm filter)
    against the layers the study's model adapts, on the CPU before the device is used: an impossible pair stops
    the study here (flatlora compare refuses it too, but only once a call has started on the device)."""
    from flatlora.experiments.methods import LAYER_CHECKED, get_method

    sc = study.cfg["stages"].get("variants") or {}
    if not any(get_method(m).adapter in LAYER_CHECKED for pair in sc.get("pairs", []) for m in pair):
        return
    from flatlora.experiments.compare import check_layer_kinds
    from flatlora.experiments.spec import ExperimentSpec
    from flatlora.experiments.tasks import create_task

    spec = ExperimentSpec.from_dict(study.calls("variants")[0][0].spec)
    try:
        task = create_task(spec.task, model=spec.model, **spec.task_args)
    except (OSError, ValueError) as e:  # e.g. data not fetched on this machine: compare checks it on the device
        print(f"   (variants: layer kinds not checked here: {e})", flush=True)
        return
    try:
        check_layer_kinds(spec, task)
    except ValueError as e:
        raise SystemExit(f"{study.cfg['config_path']}: stages.variants: {e} (here: drop that pair from "
                         "stages.variants.pairs)") from None


def merge(a: dict, b: dict) -> dict:
    """Recursive dict merge, b wins (lists are replaced, not joined)."""
    out = copy.deepcopy(a)
    for k, v in (b or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def get_dotted(d: dict, key: str, default: Any = None) -> Any:
    for p in key.split("."):
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def seed_list(v: Any) -> list[int]:
    """`[0, 1]`, or `{start: 100, count: 10}` -> [100, ..., 109]."""
    if isinstance(v, dict):
        return list(range(int(v.get("start", 0)), int(v.get("start", 0)) + int(v["count"])))
    return [int(s) for s in v]


def fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------- calls (one `flatlora compare` each)
@dataclass
class Call:
    stage: str
    point: str                 # grid point name ("" for main)
    params: dict               # the point's parameters, e.g. {"train.lr": 5e-4, "train.epochs": 3}
    spec: dict                 # full spec dict for compare (methods, ranks, seeds, out_dir set)
    est_run_s: float           # estimated seconds of one run of this call (mean over its methods)

    @property
    def out_dir(self) -> Path:
        return Path(self.spec["out_dir"])

    def run_names(self) -> list[str]:
        from flatlora.experiments.compare import run_name

        ranks = self.spec.get("ranks") or [self.spec["lora"]["r"]]
        return [run_name(m, r, s) for s in self.spec["seeds"] for r in ranks for m in self.spec["methods"]]

    def unfinished(self) -> list[str]:
        return [n for n in self.run_names() if not (self.out_dir / "runs" / n / "metrics.json").exists()]


@dataclass
class Budget:
    jobs: int = 1
    deadline: float = math.inf     # time.time() after which nothing new starts and running calls stop
    efficiency: float = 0.75       # throughput of N parallel runs = N x efficiency runs (N > 1)
    call_overhead_s: float = 10.0  # start of one compare process (imports, task build)
    threads: int | None = None     # CPU threads per run; None: cores / jobs

    def threads_per_run(self) -> int:
        """Every run of every call gets a share of the cores: with the default (torch takes all cores per
        process) the H200's 16 cores ran 4 concurrent one-run calls at 16 threads each and 8-run calls at 8,
        and a 135M model's step took 0.8-1 s."""
        return self.threads or max(1, (os.cpu_count() or 1) // self.jobs)

    def wall(self, runs: int, run_s: float, jobs: int) -> float:
        """Estimated wall seconds of `runs` runs of `run_s` each, `jobs` at a time."""
        if runs == 0:
            return 0.0
        eff = 1.0 if jobs <= 1 else self.efficiency
        return self.call_overhead_s + runs * run_s / (jobs * eff)


def run_seconds(cfg: dict, spec: dict, method: str) -> float:
    """Estimated seconds of one run on the study's device.

    From the config: `seconds: {fixed, per_epoch, flat_cost}` -> fixed + per_epoch x epochs (x flat_cost for
    flat-*). Once the study has finished runs of a method, their measured training seconds per epoch and
    evaluation seconds replace the guess (`fixed` then keeps only `load`, the model build outside the timers).
    `method_cost: {name: x}` scales a method's run (x LoRA's, or x Flat-LoRA's for flat-name) until it is measured."""
    sec = cfg.get("seconds", {})
    epochs = float(get_dotted(spec, "train.epochs", 1))
    measured = cfg.get("_measured", {}).get(method)
    if measured:
        return float(sec.get("load", 5)) + measured["eval"] + measured["per_epoch"] * epochs
    flat = method.startswith("flat-")
    base = method[len("flat-"):] if flat else method
    cost = float((sec.get("method_cost") or {}).get(base, 1.0))  # e.g. {dora: 1.5, lora-sam: 2.0}: guesses until measured
    ref = cfg.get("_measured", {}).get("flat-lora" if flat else "lora")
    if ref:  # a variant not measured yet: the measured LoRA (Flat-LoRA) speed times its cost guess
        return float(sec.get("load", 5)) + ref["eval"] + ref["per_epoch"] * epochs * cost
    s = (float(sec.get("fixed", 5)) + float(sec.get("per_epoch", 5)) * epochs) * cost
    return s * float(sec.get("flat_cost", 1.15)) if flat else s


def call_estimate(cfg: dict, call_spec: dict) -> float:
    ms = call_spec["methods"]
    return sum(run_seconds(cfg, call_spec, m) for m in ms) / len(ms)


def child_env() -> dict[str, str]:
    """This process's environment with this checkout's src/ first on PYTHONPATH (compare runs this flatlora)."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src")] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # many runs share the cores: idle OpenMP threads must not spin
    return env


def run_calls(calls: list[Call], budget: Budget, *, can_jobs: bool, log: Callable[[str], None] = print,
              dry_run: bool = False) -> dict[str, list[str]]:
    """Run the calls, up to `budget.jobs` runs at once in total, none after the deadline.

    Calls that share an out_dir run one after the other (compare writes its summary there). With a
    flatlora whose compare has no --jobs, each call runs its runs one by one and up to `jobs` calls run
    at once instead. Returns {'done': [...], 'failed': [...], 'skipped': [...]} (call labels)."""
    status: dict[str, list[str]] = {"done": [], "failed": [], "skipped": []}
    pending = [c for c in calls if c.unfinished()]
    for c in calls:
        if not c.unfinished():
            status["done"].append(label(c))
    running: list[tuple[Call, subprocess.Popen, int, Any]] = []
    try:
        _schedule(pending, running, status, budget, can_jobs, log, dry_run)
    finally:  # an exception or Ctrl-C here: no compare call outlives the driver
        for c, proc, _, (logf, _) in running:
            stop(proc)
            logf.close()
    return status


def _schedule(pending: list[Call], running: list, status: dict[str, list[str]], budget: Budget, can_jobs: bool,
              log: Callable[[str], None], dry_run: bool) -> None:
    import yaml

    while pending or running:
        now = time.time()
        used = sum(j for _, _, j, _ in running)
        busy_dirs = {c.out_dir for c, _, _, _ in running}
        for c in list(pending):
            todo = len(c.unfinished())
            j = min(todo, budget.jobs) if can_jobs else 1
            if c.out_dir in busy_dirs or used + j > budget.jobs:
                continue
            est = budget.wall(todo, c.est_run_s, j)
            if now + est > budget.deadline:
                pending.remove(c)
                status["skipped"].append(label(c))
                log(f"  skip {label(c)}: {todo} runs, ~{est:.0f} s, do not fit the budget")
                continue
            pending.remove(c)
            c.out_dir.mkdir(parents=True, exist_ok=True)
            spec_file = c.out_dir / "study_call.yaml"
            if not c.spec.setdefault("train", {}).get("threads"):  # a spec's own setting wins; not part of a run's key
                c.spec["train"]["threads"] = budget.threads_per_run()
            spec_file.write_text("# written by benchmarks/evidence/study.py; `flatlora compare` of this file resumes it\n"
                                 + yaml.safe_dump(c.spec, sort_keys=False))
            cmd = [sys.executable, "-m", "flatlora.cli.main", "compare", str(spec_file), "--no-progress"]
            if can_jobs and j > 1:
                cmd += ["--jobs", str(j)]
            log(f"  start {label(c)}: {todo} runs, jobs {j}, ~{est:.0f} s" + ("  [dry run]" if dry_run else ""))
            if dry_run:
                status["done"].append(label(c))
                continue
            logf = open(c.out_dir / "compare.log", "a")
            logf.write(f"$ {' '.join(cmd)}\n")
            logf.flush()
            # Own process group (stop() ends a call and its job processes together), same session: a driver
            # killed from outside takes its calls with it instead of leaving them running on the device.
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, process_group=0,
                                    env=child_env(), cwd=str(ROOT))
            running.append((c, proc, j, (logf, time.time())))
            used += j
            busy_dirs.add(c.out_dir)
        if not running:  # nothing runs, so every pending call was started or skipped
            break
        time.sleep(0.5 if running else 0)
        for item in list(running):
            c, proc, j, (logf, t0) = item
            rc = proc.poll()
            if rc is None and time.time() > budget.deadline:
                log(f"  stop {label(c)}: budget reached (finished runs are kept)")
                stop(proc)
                rc = proc.wait()
                status["skipped"].append(label(c))
                running.remove(item)
                logf.close()
                continue
            if rc is None:
                continue
            running.remove(item)
            logf.close()
            left = len(c.unfinished())
            ok = rc == 0 and left == 0
            status["done" if ok else "failed"].append(label(c))
            log(f"  {'done' if ok else 'FAILED'} {label(c)} in {time.time() - t0:.0f} s"
                + ("" if ok else f" (exit {rc}, {left} runs unfinished; see {c.out_dir / 'compare.log'})"))


def stop(proc: subprocess.Popen) -> None:
    """End a compare call and the job processes it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def label(c: Call) -> str:
    return f"{c.stage}/{c.point}" if c.point else c.stage


# ---------------------------------------------------------------------- stages
class Study:
    def __init__(self, cfg: dict, out_root: Path, device: str | None = None):
        self.cfg, self.name = cfg, cfg["study"]
        self.dir = out_root / self.name
        self.device = device
        self.planning = False  # --plan: the sam stage's equal-time calls are estimated before they can be measured

    # -- specs
    def base_spec(self) -> dict:
        from flatlora.experiments.spec import ExperimentSpec

        spec = copy.deepcopy(self.cfg["spec"])
        if self.device:
            set_dotted(spec, "train.device", self.device)
        return ExperimentSpec.from_dict(spec).to_dict()

    def stage_cfg(self, stage: str) -> dict:
        return self.cfg["stages"].get(stage) or {}

    def borrowed(self) -> tuple[str | None, list[str]]:
        """`choices_from: {study: llm, stages: [...]}`: the study whose choices of those stages this one applies
        (in the same results root) instead of choosing again, e.g. the quantized variant of a study."""
        src = self.cfg.get("choices_from") or {}
        return src.get("study"), [s for s in ("headroom", "recipe", "sigma") if s in (src.get("stages") or [])]

    def choice(self, stage: str) -> dict | None:
        other, stages = self.borrowed()
        f = (self.dir.parent / other if stage in stages else self.dir) / stage / "choice.json"
        return json.loads(f.read_text()) if f.exists() else None

    def tuned_spec(self, upto: str) -> tuple[dict, list[str]]:
        """The base spec with the choices of the stages before `upto` applied (own or borrowed); and what is
        still pending."""
        spec, pending = self.base_spec(), []
        other, borrowed = self.borrowed()
        order = [s for s in ("headroom", "recipe", "sigma") if s in self.cfg["stages"] or s in borrowed]
        for stage in order[:order.index(upto) if upto in order else len(order)]:
            ch = self.choice(stage)
            if ch is None or not ch.get("chosen"):
                pending.append(f"{other}'s {stage}" if stage in borrowed else stage)
                continue
            if not str(ch.get("metric", "")).startswith("dev/"):
                raise SystemExit(f"{self.dir / stage / 'choice.json'} was chosen on {ch.get('metric')!r}: only a dev "
                                 f"metric may choose (nothing is tuned on test); delete it and re-run the {stage} stage")
            for k, v in ch["chosen"].items():
                set_dotted(spec, k, v)
        return spec, pending

    def make_call(self, stage: str, point: str, params: dict, spec: dict, methods: list[str], ranks: list[int],
                  seeds: list[int], out_dir: Path) -> Call:
        from flatlora.experiments.spec import ExperimentSpec

        s = copy.deepcopy(spec)
        for k, v in params.items():
            set_dotted(s, k, v)
        s.update(methods=methods, ranks=ranks, seeds=seeds, out_dir=str(out_dir), baseline=None,
                 description=f"evidence study {self.name}, stage {stage}" + (f", {point}" if point else ""))
        set_dotted(s, "lora.r", ranks[0])
        s = ExperimentSpec.from_dict(s).to_dict()  # validated before anything trains
        return Call(stage, point, params, s, call_estimate(self.cfg, s))

    def calls(self, stage: str, block_runs: int = 8) -> tuple[list[Call], list[str]]:
        """The compare calls of a stage, and the earlier choices it still waits for (their defaults used)."""
        sc = self.stage_cfg(stage)
        spec, pending = self.tuned_spec(stage)
        d = self.dir / stage
        rank = int(sc.get("rank", 8))
        if stage == "headroom":
            key = sc.get("knob", "task_args.level")
            return [self.make_call(stage, f"{key.split('.')[-1]}_{fmt_value(v)}", {key: v}, spec, ["lora"], [rank],
                                   seed_list(sc.get("seeds", [0])), d / f"{key.split('.')[-1]}_{fmt_value(v)}")
                    for v in sc["values"]], pending
        if stage == "recipe":
            grid = grid_points(sc["grid"])
            return [self.make_call(stage, point_name(p), p, spec, ["lora"], [rank], seed_list(sc["seeds"]),
                                   d / point_name(p)) for p in grid], pending
        if stage == "sigma":
            return [self.make_call(stage, f"sigma_{fmt_value(s)}", {"flat.sigma": s}, spec, ["flat-lora"], [rank],
                                   seed_list(sc["seeds"]), d / f"sigma_{fmt_value(s)}") for s in sc["sigmas"]], pending
        if stage in COMPARISONS:
            ranks = [int(r) for r in sc.get("ranks", [rank] if stage == "variants" else [8, 16])]
            methods = [m for pair in sc["pairs"] for m in pair] if stage == "variants" else sc.get("methods", ["lora", "flat-lora"])
            extra = {k: v for k, v in (sc.get("set") or {}).items()}
            return self.seed_blocks(stage, "", extra, spec, methods, ranks, seed_list(sc["seeds"]), d, block_runs), pending
        if stage == "sam":
            seeds, extra = seed_list(sc["seeds"]), dict(sc.get("set") or {})
            calls = self.seed_blocks(stage, "equal_steps", extra, spec, ["lora", "flat-lora", *sc["methods"]], [rank],
                                     seeds, d / "equal_steps", block_runs)
            for m in sc["methods"]:
                t = self.sam_timing(m)
                if t is None and not self.planning:
                    continue  # waits for its measurements (run_stage computes the budget once they exist)
                if t is None:  # --plan before anything was measured: the configured cost guesses
                    sec = self.cfg.get("seconds", {})
                    scale = float(sec.get("flat_cost", 1.15)) / float((sec.get("method_cost") or {}).get(m, 2.0))
                    params = {**extra, "train.epochs": float(get_dotted(spec, "train.epochs", 1)) * scale}
                    est = None
                else:
                    params = {**extra, "train.max_steps": t["max_steps"], "train.epochs": t["epochs"]}
                    # Flat-LoRA's training seconds by construction, plus the model load and the SAM run's evaluation
                    est = (t["flat_seconds"] + float(self.cfg.get("seconds", {}).get("load", 5))
                           + float((self.cfg.get("_measured", {}).get(m) or {}).get("eval", 0.0)))
                blocks = self.seed_blocks(stage, f"equal_time_{m}", params, spec, [m], [rank], seeds,
                                          d / f"equal_time_{m}", block_runs)
                for c in blocks:
                    c.est_run_s = max(1.0, est) if est is not None else c.est_run_s
                calls += blocks
            return calls, pending
        raise ValueError(stage)

    def seed_blocks(self, stage: str, point: str, params: dict, spec: dict, methods: list[str], ranks: list[int],
                    seeds: list[int], out_dir: Path, block_runs: int) -> list[Call]:
        """Calls over blocks of whole seeds (complete pairs) of about `block_runs` runs: the budget is checked per block."""
        k = max(1, block_runs // (len(ranks) * len(methods)))
        blocks = [seeds[i:i + k] for i in range(0, len(seeds), k)]
        return [self.make_call(stage, "_".join(x for x in (point, f"seeds_{b[0]}-{b[-1]}" if len(blocks) > 1 else "") if x),
                               params, spec, methods, ranks, b, out_dir) for b in blocks]

    # -- equal wall-clock budget of the SAM baselines
    def sam_timing(self, method: str) -> dict | None:
        """The frozen equal-wall-clock budget of a SAM method (sam/timing.json); computed and frozen here the first
        time both measurements exist: Flat-LoRA's training seconds per run (main's runs at the stage's rank, or
        this stage's equal-steps runs with time_reference: stage) and `method`'s, every equal-steps seed finished."""
        f = self.dir / "sam" / "timing.json"
        frozen = json.loads(f.read_text()) if f.exists() else {}
        if method in frozen:
            return frozen[method]
        sc = self.stage_cfg("sam")
        rank, ref = int(sc.get("rank", 8)), sc.get("time_reference", "main")
        steps_dir = self.dir / "sam" / "equal_steps"
        flat_dir = self.dir / "main" if ref == "main" else steps_dir
        flat = [r for r in _finished(flat_dir) if r["method"] == "flat-lora" and r["rank"] == rank]
        mine = [r for r in _finished(steps_dir) if r["method"] == method and r["rank"] == rank]
        if not flat or sorted(r["seed"] for r in mine) != sorted(seed_list(sc["seeds"])):
            return None
        t = equal_time_budget([r["train_seconds"] for r in flat], [r["train_seconds"] for r in mine],
                              [r["steps"] for r in mine], float(get_dotted(self.tuned_spec("sam")[0], "train.epochs", 1)))
        stage_flat = [r["train_seconds"] for r in _finished(steps_dir) if r["method"] == "flat-lora" and r["rank"] == rank]
        here = sum(stage_flat) / len(stage_flat) if stage_flat else None
        if ref == "main" and here is not None:
            # Seconds per run scale with how many runs share the GPU: main's Flat-LoRA timed under other load than
            # the SAM runs it is divided by gives SAM the wrong share of steps (2026-12-03: 94 vs 185 s/run).
            there = t["flat_seconds"]
            if abs(here - there) > SAM_TIME_TOLERANCE * there:
                raise SystemExit(f"{Path(self.cfg['config_path']).name}: stages.sam: Flat-LoRA trained {there:.0f} s/run in main but "
                                 f"{here:.0f} s/run beside the SAM runs of this stage (more than "
                                 f"{SAM_TIME_TOLERANCE:.0%} apart: different GPU load), so main's seconds cannot "
                                 "set SAM's budget; set time_reference: stage")
        t.update(method=method, rank=rank, time_reference=ref,
                 flat_source=f"{flat_dir.relative_to(self.dir)}: flat-lora r{rank}, seeds {sorted(r['seed'] for r in flat)}",
                 sam_source=f"{steps_dir.relative_to(self.dir)}: {method} r{rank}, seeds {sorted(r['seed'] for r in mine)}",
                 flat_seconds_this_stage=here,
                 measured=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        if not self.planning:
            f.parent.mkdir(parents=True, exist_ok=True)
            frozen[method] = t
            f.write_text(json.dumps(frozen, indent=1))
        return t

    # -- summaries and choices
    def records(self, stage: str) -> list[dict]:
        """Finished run records of a stage (metrics.json), each with its grid point and parameters."""
        out = []
        for f in sorted((self.dir / stage).glob("**/runs/*/metrics.json")):
            rec = json.loads(f.read_text())
            point_dir = f.parents[2]
            rec["point"] = "" if point_dir == self.dir / stage else point_dir.name
            call_file = point_dir / "study_call.yaml"
            rec["run_dir"] = str(f.parent)
            rec["params"] = {}
            if call_file.exists():
                import yaml

                s = yaml.safe_load(call_file.read_text())
                for key in self.point_keys(stage):
                    rec["params"][key] = get_dotted(s, key)
            out.append(rec)
        return out

    def point_keys(self, stage: str) -> list[str]:
        sc = self.stage_cfg(stage)
        return {"headroom": [sc.get("knob", "task_args.level")], "recipe": list((sc.get("grid") or {}).keys()),
                "sigma": ["flat.sigma"], "sam": ["train.max_steps", "train.epochs"]}.get(stage, [])

    def summarize(self, stage: str) -> dict | None:
        recs = self.records(stage)
        if not recs:
            return None
        d = self.dir / stage
        if stage in COMPARISONS:
            return summarize_comparison(d, recs, self.cfg, stage)
        if stage == "sam":
            f = d / "timing.json"
            return summarize_sam(d, recs, self.cfg, self.stage_cfg(stage), json.loads(f.read_text()) if f.exists() else {})
        return summarize_grid(d, stage, recs, self.cfg, self.stage_cfg(stage), self.point_keys(stage),
                              expected=[c.point for c in self.calls(stage)[0]],
                              seeds=self._grid_seeds(stage), baseline=self._sigma_baseline(stage))

    def _grid_seeds(self, stage: str) -> list[int]:
        return seed_list(self.stage_cfg(stage).get("seeds", [0]))

    def _sigma_baseline(self, stage: str) -> list[dict] | None:
        """For the sigma stage: the LoRA runs of the chosen recipe (same seeds), the σ = 0 point of the curve."""
        if stage != "sigma":
            return None
        ch = self.choice("recipe")
        if not ch or not ch.get("chosen"):
            return None
        return [r for r in self.records("recipe") if r["point"] == ch["point"]]


def _finished(d: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(d.glob("**/runs/*/metrics.json"))] if d.is_dir() else []


def equal_time_budget(flat_seconds: list[float], sam_seconds: list[float], sam_steps: list[int], epochs: float) -> dict:
    """The step budget that gives a SAM method Flat-LoRA's training seconds per run.

    scale = mean Flat-LoRA training seconds / mean SAM training seconds (SAM at equal steps); SAM then trains
    max_steps = round(scale x its equal-steps steps) (its lr schedule compressed to them), and epochs x scale
    when scale > 1 so the epochs do not cap the steps first.

    Example:
        >>> t = equal_time_budget([97.0, 99.0], [180.0, 184.0], [1160, 1160], 5)
        >>> round(t["scale"], 4), t["max_steps"], t["epochs"]
        (0.5385, 625, 5.0)
    """
    flat = sum(flat_seconds) / len(flat_seconds)
    sam = sum(sam_seconds) / len(sam_seconds)
    steps = sum(sam_steps) / len(sam_steps)
    if sam <= 0 or flat <= 0:
        raise ValueError(f"equal wall-clock needs positive training seconds, got Flat-LoRA {flat} and SAM {sam}")
    scale = flat / sam
    return {"flat_seconds": flat, "flat_n": len(flat_seconds), "sam_seconds": sam, "sam_n": len(sam_seconds),
            "sam_steps": steps, "sam_seconds_per_step": sam / steps, "scale": scale,
            "max_steps": max(1, round(steps * scale)), "epochs": epochs * max(1.0, scale)}


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Cartesian product of {key: values}, in the order given (first key slowest)."""
    points: list[dict] = [{}]
    for k, vs in grid.items():
        points = [{**p, k: v} for p in points for v in vs]
    return points


def point_name(p: dict) -> str:
    short = {"train.lr": "lr", "train.epochs": "ep", "flat.sigma": "sigma", "task_args.level": "level"}
    return "_".join(f"{short.get(k, k.split('.')[-1])}{fmt_value(v)}" for k, v in p.items())


def choose_best(points: list[dict], metric: str) -> dict | None:
    """The complete point with the highest mean `metric` (first in grid order on ties). Only dev metrics.

    Example:
        >>> choose_best([{"point": "a", "complete": True, "mean": 0.80}, {"point": "b", "complete": True, "mean": 0.82}], "dev/accuracy")["point"]
        'b'
    """
    if not metric.startswith("dev/"):
        raise ValueError(f"choices are made on the dev split only, got metric {metric!r}")
    done = [p for p in points if p["complete"]]
    if not done:
        return None
    best = max(p["mean"] for p in done)
    return next(p for p in done if p["mean"] == best)


def choose_headroom(points: list[dict], metric: str, lo: float, hi: float) -> tuple[dict | None, bool]:
    """The complete point whose mean dev metric is inside [lo, hi] and closest to its middle; else the
    closest to the interval, flagged as without headroom. Returns (point, has_headroom)."""
    if not metric.startswith("dev/"):
        raise ValueError(f"choices are made on the dev split only, got metric {metric!r}")
    done = [p for p in points if p["complete"]]
    if not done:
        return None, False
    inside = [p for p in done if lo <= p["mean"] <= hi]
    if inside:
        mid = (lo + hi) / 2
        return min(inside, key=lambda p: abs(p["mean"] - mid)), True
    return min(done, key=lambda p: min(abs(p["mean"] - lo), abs(p["mean"] - hi))), False


def summarize_grid(d: Path, stage: str, recs: list[dict], cfg: dict, sc: dict, keys: list[str], expected: list[str],
                   seeds: list[int], baseline: list[dict] | None) -> dict:
    """runs.csv, summary.json and (when every point is complete) choice.json of a grid stage."""
    from flatlora.experiments.results import mean_std, paired_stats

    metric = cfg["dev_metric"]
    metrics = sorted({k for r in recs for k in r["metrics"]})
    write_runs_csv(d / "runs.csv", recs, metrics, keys)
    points = []
    base_by_seed = {r["seed"]: r for r in baseline or []}
    for name in expected:
        rs = sorted((r for r in recs if r["point"] == name), key=lambda r: r["seed"])
        vals = [r["metrics"][metric] for r in rs if metric in r["metrics"]]
        p: dict[str, Any] = {"point": name, "params": rs[0]["params"] if rs else {}, "n": len(vals),
                             "seeds": [r["seed"] for r in rs], "complete": sorted(r["seed"] for r in rs) == sorted(seeds),
                             "per_seed": {str(r["seed"]): r["metrics"].get(metric) for r in rs},
                             "train_seconds": mean_std([r["train_seconds"] for r in rs])[0] if rs else None}
        if vals:
            p["mean"], p["std"] = mean_std(vals)
        if baseline and rs:
            common = [r["seed"] for r in rs if r["seed"] in base_by_seed and metric in r["metrics"]]
            p["vs_lora"] = paired_stats([next(r for r in rs if r["seed"] == s)["metrics"][metric] for s in common],
                                        [base_by_seed[s]["metrics"][metric] for s in common])
        points.append(p)
    summary: dict[str, Any] = {"stage": stage, "metric": metric, "seeds": seeds, "points": points}
    if baseline:
        vals = [r["metrics"][metric] for r in baseline if metric in r["metrics"]]
        summary["lora_baseline"] = {"point": baseline[0]["point"], "seeds": sorted(base_by_seed), "mean": mean_std(vals)[0],
                                    "std": mean_std(vals)[1], "per_seed": {str(r["seed"]): r["metrics"].get(metric) for r in baseline}}
    complete = all(p["complete"] for p in points)
    choice: dict[str, Any] | None = None
    if complete:
        if stage == "headroom":
            lo, hi = sc.get("range", [0.2, 0.8])
            best, ok = choose_headroom(points, metric, lo, hi)
            choice = {"point": best["point"], "chosen": best["params"], "mean": best["mean"], "has_headroom": ok,
                      "rule": f"LoRA {metric} inside [{lo:g}, {hi:g}] and closest to {(lo + hi) / 2:g} "
                              "(else closest to the interval, flagged has_headroom=false)"}
        else:
            best = choose_best(points, metric)
            choice = {"point": best["point"], "chosen": best["params"], "mean": best["mean"], "std": best.get("std"),
                      "rule": f"highest mean {metric} over seeds {seeds} (first in grid order on ties)"}
        choice["metric"], choice["seeds"] = metric, seeds
        (d / "choice.json").write_text(json.dumps(choice, indent=1))
    summary["choice"] = choice
    summary["complete"] = complete
    (d / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def summarize_sam(d: Path, recs: list[dict], cfg: dict, sc: dict, timing: dict) -> dict:
    """runs.csv and summary.json of the sam stage: cells per (method, budget) and each SAM method, at equal steps
    and at equal wall-clock, paired by seed against this stage's Flat-LoRA and LoRA (equal steps)."""
    from flatlora.experiments.results import _metric_order, mean_std, paired_stats

    done = [r for r in recs if r.get("status", "done") == "done"]
    metrics = sorted({k for r in done for k in r["metrics"]}, key=_metric_order)
    write_runs_csv(d / "runs.csv", recs, metrics, ["train.max_steps", "train.epochs"])
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for r in done:
        budget = "equal_steps" if r["point"] == "equal_steps" else "equal_time"
        groups.setdefault((r["method"], budget), {})[r["seed"]] = r
    order = ["lora", "flat-lora", *sc.get("methods", [])]
    cells = []
    for (m, b), by_seed in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99, kv[0][1] != "equal_steps")):
        rs = [by_seed[s] for s in sorted(by_seed)]
        c: dict[str, Any] = {"method": m, "budget": b, "n": len(rs), "seeds": sorted(by_seed),
                             "train_seconds": mean_std([r["train_seconds"] for r in rs])[0],
                             "eval_seconds": mean_std([r.get("eval_seconds", math.nan) for r in rs])[0],
                             "steps": mean_std([r["steps"] for r in rs])[0]}
        for k in metrics:
            v = [r["metrics"][k] for r in rs if k in r["metrics"]]
            if v:
                c[k] = dict(zip(("mean", "std"), mean_std(v)))
        cells.append(c)
    pairs = []
    contenders = [(m, b) for m, b in groups if m in sc.get("methods", [])] + [("flat-lora", "equal_steps")]
    for m, b in sorted(contenders, key=lambda x: (order.index(x[0]) if x[0] in order else 99, x[1] != "equal_steps")):
        for base in ("flat-lora", "lora"):
            if base == m or (base, "equal_steps") not in groups or (m, b) not in groups:
                continue
            mine, theirs = groups[(m, b)], groups[(base, "equal_steps")]
            for k in metrics:
                seeds = sorted(s for s in mine if s in theirs and k in mine[s]["metrics"] and k in theirs[s]["metrics"])
                pairs.append({"method": m, "budget": b, "baseline": base, "metric": k, "seeds": seeds,
                              **paired_stats([mine[s]["metrics"][k] for s in seeds], [theirs[s]["metrics"][k] for s in seeds])})
    summary = {"stage": "sam", "rank": int(sc.get("rank", 8)), "test_metric": cfg["test_metric"], "metrics": metrics,
               "seeds": seed_list(sc["seeds"]), "methods": sc.get("methods", []), "cells": cells, "pairs": pairs,
               "timing": timing, "time_reference": sc.get("time_reference", "main"),
               "equal_wall_clock": "equal TRAINING seconds per run (the timed training loop; model load and evaluation "
                                   "excluded): each SAM method trains max_steps = its equal-steps steps x scale, scale = "
                                   "Flat-LoRA's mean training seconds per run (time_reference: main = main's flat-lora "
                                   "runs at this rank; stage = this stage's equal-steps flat-lora runs) / the SAM "
                                   "method's mean training seconds per run at equal steps; frozen in timing.json"}
    (d / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def summarize_comparison(d: Path, recs: list[dict], cfg: dict, stage: str) -> dict:
    """summary.{md,json}, runs.csv, pairs.csv (flatlora's own format) and plot.png over every finished run."""
    from flatlora.experiments.results import plot_summary, summarize, write_summary

    summary = summarize(recs, baseline=None)
    summary.update(stage=stage, test_metric=cfg["test_metric"])
    peak = [x.get("peak_memory_mb") for x in recs if x.get("peak_memory_mb") is not None]
    if peak:
        summary["peak_memory_mb"] = {f"{m}_r{r}": max(x["peak_memory_mb"] for x in recs if x["method"] == m and x["rank"] == r
                                                      and x.get("peak_memory_mb") is not None)
                                     for m, r in {(x["method"], x["rank"]) for x in recs if x.get("peak_memory_mb") is not None}}
    write_summary(d, recs, summary, f"{cfg['study']} · {stage} · {len({r['seed'] for r in recs})} seeds")
    (d / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    try:
        plot_summary(recs, summary, d / "plot.png")
    except ImportError:
        pass
    return summary


def write_runs_csv(path: Path, recs: list[dict], metrics: list[str], keys: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["point", *keys, "method", "rank", "seed", *metrics, "train_seconds", "eval_seconds", "steps"])
        for r in sorted(recs, key=lambda r: (r["point"], r["method"], r["rank"], r["seed"])):
            w.writerow([r["point"], *[r["params"].get(k) for k in keys], r["method"], r["rank"], r["seed"],
                        *[r["metrics"].get(m, "") for m in metrics], r["train_seconds"], r.get("eval_seconds", ""),
                        r["steps"]])


# ---------------------------------------------------------------------- sharpness
def sharpness_stage(study: Study, budget: Budget, log: Callable[[str], None], dry_run: bool = False) -> dict | None:
    """Sharpness of main's runs at one rank, paired across seeds (flat-lora - lora); resumable per run."""
    sc = study.stage_cfg("sharpness")
    rank = int(sc.get("rank", 8))
    runs_dir = study.dir / "main" / "runs"
    d = study.dir / "sharpness"
    from flatlora.experiments.compare import run_name

    seeds = sorted({int(p.name.rsplit("_s", 1)[1]) for p in runs_dir.glob(f"*_r{rank}_s*") if (p / "metrics.json").exists()})
    if sc.get("seeds") is not None:
        seeds = [s for s in seeds if s in seed_list(sc["seeds"])]
    methods = ["lora", "flat-lora"]
    todo = [(m, s) for s in seeds for m in methods
            if (runs_dir / run_name(m, rank, s) / "metrics.json").exists()
            and not (d / "per_run" / f"{run_name(m, rank, s)}.json").exists()]
    est = float(sc.get("seconds_per_run", 10))
    log(f"  sharpness: {len(todo)} models to measure (~{est:.0f} s each)" + ("  [dry run]" if dry_run else ""))
    if todo and not dry_run:
        measure_sharpness(study, sc, rank, todo, runs_dir, d, budget, est, log)
    return summarize_sharpness(d, sc)


def measure_sharpness(study: Study, sc: dict, rank: int, todo: list[tuple[str, int]], runs_dir: Path, d: Path,
                      budget: Budget, est: float, log: Callable[[str], None]) -> None:
    import torch

    from flatlora.analysis import mean_over
    from flatlora.analysis.sharpness import expected_sharpness, top_hessian_eigenvalue
    from flatlora.cli.landscape import analysis_batches, load_run
    from flatlora.experiments.compare import run_name
    from flatlora.experiments.tasks.base import to_device

    (d / "per_run").mkdir(parents=True, exist_ok=True)
    device = study.device if study.device and study.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sigmas = [float(s) for s in sc.get("sigmas", [0.05, 0.1])]
    retrain_missing(study, sc, rank, todo, runs_dir, d, device, budget, est, log)
    task = batches = None
    for m, s in todo:
        if time.time() + est > budget.deadline:
            log("  sharpness: budget reached, the rest is left for the next call")
            break
        t0 = time.time()
        main_dir = run_dir = runs_dir / run_name(m, rank, s)
        if not (run_dir / "weights.safetensors").exists():  # a run packed without its weights (another call)
            run_dir = d / "retrained" / "runs" / main_dir.name
            if not (run_dir / "weights.safetensors").exists():
                continue  # retrain_missing logged why (off, over budget, or the retrain failed)
        # The model is rebuilt from each run's config (its seed may shape frozen parts, e.g. a new pooler or a
        # tiny random base); the task, its tokenised data and the analysis batches are shared.
        loaded = load_run(run_dir, device=device, task=task)
        model, task = loaded.model, loaded.task
        if batches is None:
            batches = [to_device(b, device) for b in analysis_batches(task, int(sc.get("batches", 4)),
                                                                      int(sc.get("batch_size", 32)), 0)]
        model.eval()
        loss_fn = mean_over(batches, task.loss)
        exp = expected_sharpness(model, loss_fn, sigmas=sigmas, n_samples=int(sc.get("samples", 8)), seed=0)
        top = top_hessian_eigenvalue(model, loss_fn, iters=int(sc.get("power_iters", 10)), seed=0,
                                     hvp=sc.get("hvp", "auto"))
        rec = json.loads((run_dir / "metrics.json").read_text())
        out = {"method": m, "rank": rank, "seed": s, "run_dir": str(run_dir.relative_to(study.dir)),
               "retrained": run_dir != main_dir,
               "main_test_metric": json.loads((main_dir / "metrics.json").read_text())["metrics"].get(study.cfg["test_metric"]),
               "base_loss": exp[0]["loss"] - exp[0]["increase"],
               "expected": [{k: v for k, v in row.items()} for row in exp], "hessian": top,
               "test_metric": rec["metrics"].get(study.cfg["test_metric"]), "seconds": round(time.time() - t0, 1),
               "settings": {k: sc.get(k) for k in ("batches", "batch_size", "samples", "power_iters", "sigmas")}}
        (d / "per_run" / f"{run_name(m, rank, s)}.json").write_text(json.dumps(out, indent=1, default=float))
        log(f"  sharpness {run_name(m, rank, s)}: loss {out['base_loss']:.4f}, "
            + ", ".join(f"E-sharp σ={r['sigma']:g} {r['increase']:.4g}" for r in exp)
            + f", λ_max {top['eigenvalue']:.4g} ({out['seconds']} s)")


def _retrain_grid(study: Study, rank: int, pairs: list[tuple[str, int]], budget: Budget) -> tuple[list, list, list, int, float]:
    """Of `pairs` (method, seed), the main runs that have no weights here, neither main's nor a retrained copy
    (packs leave weights behind): (missing, methods, seeds, jobs, seconds to retrain them). `flatlora compare`
    trains the whole methods x seeds grid, `jobs` at a time, so the seconds are the grid's."""
    from flatlora.experiments.compare import run_name

    runs, again = study.dir / "main" / "runs", study.dir / "sharpness" / "retrained" / "runs"
    missing = [(m, s) for m, s in pairs if (runs / run_name(m, rank, s) / "metrics.json").exists()
               and not (runs / run_name(m, rank, s) / "weights.safetensors").exists()
               and not (again / run_name(m, rank, s) / "weights.safetensors").exists()]
    if not missing:
        return [], [], [], 0, 0.0
    methods, seeds = sorted({m for m, _ in missing}), sorted({s for _, s in missing})
    jobs = min(budget.jobs, len(methods) * len(seeds))
    longest = max(sum(json.loads((runs / run_name(m, rank, s) / "metrics.json").read_text()).get(k, 0)
                      for k in ("train_seconds", "eval_seconds")) for m, s in missing)
    return missing, methods, seeds, jobs, budget.wall(len(methods) * len(seeds), longest, jobs)


def retrain_missing(study: Study, sc: dict, rank: int, todo: list[tuple[str, int]], runs_dir: Path, d: Path,
                    device: str, budget: Budget, est: float, log: Callable[[str], None]) -> None:
    """Main runs whose weights stayed on another machine (packs leave them behind), trained again from main's
    config into sharpness/retrained/runs/, `--jobs` at a time through `flatlora compare` (same seeds, data order
    and init; on a GPU not bit-identical, so each keeps its own test metric next to main's). A retrained run that
    lost its weights the same way (packed in an earlier call) is trained once more. Skipped with `retrain: false`,
    or when retraining and measuring them does not fit the budget."""
    from flatlora.experiments.compare import compare, run_name
    from flatlora.experiments.spec import load_spec

    missing, methods, seeds, jobs, seconds = _retrain_grid(study, rank, todo, budget)
    if not missing:
        return
    names = ", ".join(run_name(m, rank, s) for m, s in missing)
    if not sc.get("retrain", True):
        log(f"  sharpness: no weights on this machine for {names}; skipped (stages.sharpness.retrain is off)")
        return
    need = seconds + len(missing) * est
    if time.time() + need > budget.deadline:
        log(f"  sharpness: no weights on this machine for {names}; training them again and measuring them "
            f"(~{need:.0f} s) does not fit the budget: left for the next call")
        return
    log(f"  sharpness: no weights on this machine for {names}; training them again from main's config, {jobs} at a "
        f"time (~{need:.0f} s with measuring)")
    again = d / "retrained"
    for m, s in missing:  # finished without weights: compare would take it as done
        shutil.rmtree(again / "runs" / run_name(m, rank, s), ignore_errors=True)
    config = str(runs_dir / run_name(missing[0][0], rank, missing[0][1]) / "config.yaml")
    sets = [f"methods=[{','.join(methods)}]", f"seeds=[{','.join(map(str, seeds))}]", f"ranks=[{rank}]",
            f"out_dir={again}", f"train.device={device}"]
    spec = load_spec(config, sets)
    if not spec.train.threads:  # a spec's own threads win, as in every other call of the study
        spec = load_spec(config, sets + [f"train.threads={budget.threads_per_run()}"])
    result = compare(spec, jobs=jobs, progress=False, log=lambda line: None)
    for e in result.errors:
        log(f"  sharpness: retraining {e['run']} raised: {e['error']}; not measured")
    for f in result.failed:
        log(f"  sharpness: retraining {run_name(f['method'], f['rank'], f['seed'])} failed ({f['reason']}); not measured")


def summarize_sharpness(d: Path, sc: dict) -> dict | None:
    from flatlora.experiments.results import mean_std, paired_stats

    files = sorted((d / "per_run").glob("*.json"))
    if not files:
        return None
    rows = [json.loads(f.read_text()) for f in files]
    measures = ["base_loss"] + [f"esharp_{r['sigma']:g}" for r in rows[0]["expected"]] + ["lambda_max"]

    def value(row: dict, key: str) -> float:
        if key == "base_loss":
            return row["base_loss"]
        if key == "lambda_max":
            return row["hessian"]["eigenvalue"]
        sigma = float(key.split("_", 1)[1])
        return next(r["increase"] for r in row["expected"] if abs(r["sigma"] - sigma) < 1e-12)

    with open(d / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "rank", "seed", *measures, "test_metric", "seconds"])
        for r in sorted(rows, key=lambda r: (r["method"], r["seed"])):
            w.writerow([r["method"], r["rank"], r["seed"], *[value(r, k) for k in measures], r["test_metric"], r["seconds"]])
    by = {(r["method"], r["seed"]): r for r in rows}
    seeds = sorted(s for (m, s) in by if m == "lora" and ("flat-lora", s) in by)
    cells = {m: {k: mean_std([value(by[(m, s)], k) for s in seeds]) for k in measures} for m in ("lora", "flat-lora")} if seeds else {}
    pairs = {k: paired_stats([value(by[("flat-lora", s)], k) for s in seeds], [value(by[("lora", s)], k) for s in seeds])
             for k in measures} if seeds else {}
    summary = {"stage": "sharpness", "rank": rows[0]["rank"], "seeds": seeds, "measures": measures,
               "cells": {m: {k: {"mean": v[0], "std": v[1]} for k, v in c.items()} for m, c in cells.items()},
               "pairs": pairs, "settings": rows[0]["settings"],
               # models trained again because main's weights stayed on another machine: (method, seed, its test
               # metric, main's), for the report
               "retrained": [[r["method"], r["seed"], r["test_metric"], r.get("main_test_metric")]
                             for r in sorted(rows, key=lambda r: (r["seed"], r["method"])) if r.get("retrained")],
               "definitions": {"base_loss": "mean training loss of W' on the analysis batches",
                               "esharp_<sigma>": "E_eps L(W'+eps) - L(W'), eps ~ N(0, sigma^2 ||W'_i||^2 / n) (filter noise)",
                               "lambda_max": "top eigenvalue of the Hessian of L w.r.t. W' (power iteration)"}}
    (d / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return summary


# ---------------------------------------------------------------------- plan, pack, main
def measured_seconds(study: Study) -> dict[str, dict[str, float]]:
    """Per method, over the study's finished runs: mean training seconds per epoch and evaluation seconds."""
    acc: dict[str, list[tuple[float, float]]] = {}
    for f in study.dir.glob("**/runs/*/metrics.json"):
        if any(part.startswith("equal_time_") for part in f.parts):
            continue  # step-capped SAM runs: their seconds per configured epoch would understate the method
        r = json.loads(f.read_text())
        epochs = float(((r.get("run_key") or {}).get("train") or {}).get("epochs") or 1)
        acc.setdefault(r["method"], []).append((r["train_seconds"] / epochs, r.get("eval_seconds", 0.0)))
    return {m: {"per_epoch": sum(a for a, _ in v) / len(v), "eval": sum(b for _, b in v) / len(v), "n": len(v)}
            for m, v in acc.items()}


def plan(study: Study, stages: list[str], budget: Budget, can_jobs: bool) -> tuple[list[str], float]:
    lines, total = [], 0.0
    for stage in stages:
        if stage == "sharpness":
            from flatlora.experiments.compare import run_name

            sc = study.stage_cfg("sharpness")
            sd = seed_list(sc["seeds"]) if sc.get("seeds") is not None else seed_list(study.stage_cfg("main")["seeds"])
            n = 2 * len(sd)
            done = len(list((study.dir / "sharpness" / "per_run").glob("*.json")))
            s = float(sc.get("seconds_per_run", 10))
            # main runs finished here without their weights (another machine's): trained again first
            rank = int(sc.get("rank", 8))
            pending = [(m, x) for x in sd for m in ("lora", "flat-lora")
                       if not (study.dir / "sharpness" / "per_run" / f"{run_name(m, rank, x)}.json").exists()]
            again, *_, retrain = _retrain_grid(study, rank, pending, budget)
            retrain = retrain if sc.get("retrain", True) else 0.0
            wall = (n - done) * s + retrain + (budget.call_overhead_s if n > done else 0)
            lines.append(f"{stage:10s} {n:5d} {done:5d} {s:9.1f} {'-':>6s} {wall:9.0f}   in-process, one model at a time"
                         + (f"; {len(again)} trained again first (~{retrain:.0f} s)" if retrain else ""))
            total += wall
            continue
        calls, pending = study.calls(stage, block_runs=2 * budget.jobs)
        runs = sum(len(c.run_names()) for c in calls)
        left = sum(len(c.unfinished()) for c in calls)
        run_s = sum(c.est_run_s * len(c.run_names()) for c in calls) / max(1, runs)
        wall = 0.0
        # sam: the equal-time calls start only after the equal-steps runs (they measure its budget): two phases
        for phase in ([c for c in calls if not c.point.startswith("equal_time")], [c for c in calls if c.point.startswith("equal_time")]):
            open_calls = [c for c in phase if c.unfinished()]
            if not open_calls:
                continue
            per_call = [min(len(c.unfinished()), budget.jobs) if can_jobs else 1 for c in open_calls]
            walls = [budget.wall(len(c.unfinished()), c.est_run_s, j) for c, j in zip(open_calls, per_call)]
            # Calls of one out_dir run one after the other; calls of a grid share the jobs.
            concurrent = 1 if len({c.out_dir for c in open_calls}) <= 1 else \
                min(len(open_calls), max(1, budget.jobs // max(per_call)))
            wall += sum(walls) / concurrent
        note = f"waits for {', '.join(pending)} (their defaults assumed here)" if pending else ""
        if stage == "sam" and not all(study.sam_timing(m) for m in study.stage_cfg("sam")["methods"]):
            note = (note + "; " if note else "") + "equal-time steps guessed from seconds.method_cost until measured"
        lines.append(f"{stage:10s} {runs:5d} {runs - left:5d} {run_s:9.1f} {len(calls):6d} {wall:9.0f}   {note}")
        total += wall
    return lines, total


def pack(out_root: Path, studies: list[str], target: Path) -> Path:
    """tar.gz of the studies' results without the trained weights and TensorBoard events (large; they stay on
    the device: curve.csv holds the same scalars), with each curve.csv gzipped (curve.csv.gz; `read_curves`
    reads either) and with one split.json per stage (every run of a stage has the same split)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    seen_split: set[Path] = set()
    with tarfile.open(target, "w:gz") as tar:
        for name in studies:
            for p in sorted((out_root / name).rglob("*")):
                if not p.is_file() or p.name.endswith(".safetensors") or ".partial" in str(p) or "tb" in p.parts:
                    continue
                if p.name == "split.json":
                    stage = p.relative_to(out_root / name).parts[0]
                    key = out_root / name / stage
                    if key in seen_split:
                        continue
                    seen_split.add(key)
                arcname = str(p.relative_to(out_root.parent))
                if p.name == "curve.csv":  # the per-step curves are most of a study's bytes, and every device
                    data = gzip.compress(p.read_bytes(), mtime=0)  # call carries the committed results
                    info = tarfile.TarInfo(arcname + ".gz")
                    info.size, info.mtime = len(data), int(p.stat().st_mtime)
                    tar.addfile(info, io.BytesIO(data))
                    continue
                tar.add(p, arcname=arcname)
    return target


def apply_sets(cfg: dict, sets: list[str]) -> dict:
    """`PATH=VALUE` changes ('/'-separated path, YAML value) applied to a study config; the result is re-checked."""
    import yaml

    for item in sets:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: use PATH=VALUE, e.g. stages/main/seeds/count=6")
        path, raw = item.split("=", 1)
        keys = [k for k in path.split("/") if k]
        d = cfg
        for k in keys[:-1]:
            if not isinstance(d.get(k), dict):
                raise SystemExit(f"--set {item!r}: {k!r} is not a section of the study config")
            d = d[k]
        d[keys[-1]] = yaml.safe_load(raw)
    if not str(cfg["dev_metric"]).startswith("dev/"):
        raise SystemExit(f"--set: dev_metric must stay a dev-split metric, got {cfg['dev_metric']!r}")
    return cfg


def record_invocation(study: Study, argv: list[str], dry_run: bool = False) -> None:
    """study.yaml (the resolved config) and one line of commands.jsonl per invocation: the protocol's record."""
    import yaml

    study.dir.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in study.cfg.items() if not k.startswith("_") and k != "tiny"}
    (study.dir / "study.yaml").write_text("# the study config as run (benchmarks/evidence/study.py)\n"
                                          + yaml.safe_dump(cfg, sort_keys=False))
    if dry_run:
        return
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    line = {"argv": ["python", "benchmarks/evidence/study.py", *argv], "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "gpu": gpu, "device": study.device or get_dotted(study.cfg["spec"], "train.device", "auto")}
    with open(study.dir / "commands.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="study.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("studies", nargs="+", help="text | image | llm (benchmarks/evidence/study_<name>.yaml) or a study YAML path")
    ap.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default: all but {','.join(OPTIONAL)})")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once on the device (flatlora compare --jobs)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: cores / --jobs; for "
                    "several studies at once on one machine, cores / the sum of their --jobs)")
    ap.add_argument("--budget-s", type=float, default=None, help="launch nothing that would end later than this many "
                    "seconds from now; stop running calls at it (finished runs are kept)")
    ap.add_argument("--plan", action="store_true", help="print runs x estimated seconds / jobs per stage; run nothing")
    ap.add_argument("--dry-run", action="store_true", help="walk the stages and print the calls without training")
    ap.add_argument("--tiny", action="store_true", help="tiny models and data from each config's `tiny:` section (CPU tests)")
    ap.add_argument("--device", default=None, help="train.device for every run (default: the config's, usually auto)")
    ap.add_argument("--out", default=None, help=f"results root (default {DEFAULT_OUT.relative_to(ROOT)}; --tiny: runs/evidence_tiny)")
    ap.add_argument("--efficiency", type=float, default=0.75, help="plan: throughput of N parallel runs is N x this (N > 1)")
    ap.add_argument("--call-overhead-s", type=float, default=10.0, help="plan: seconds to start one compare call")
    ap.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                    help="change the study config for this call, '/'-separated path and a YAML value, e.g. "
                         "stages/main/seeds/count=6 or stages/recipe/grid/train.lr=[1.0e-3] (recorded in commands.jsonl)")
    ap.add_argument("--pack", default=None, help="afterwards, write a tar.gz of the studies' results (no weights) here")
    args = ap.parse_args(argv)

    out_root = (Path(args.out) if args.out else (ROOT / "runs" / "evidence_tiny" if args.tiny else DEFAULT_OUT)).resolve()
    start = time.time()
    budget = Budget(jobs=max(1, args.jobs), deadline=start + args.budget_s if args.budget_s else math.inf,
                    efficiency=args.efficiency, call_overhead_s=args.call_overhead_s, threads=args.threads)
    wanted = args.stages.split(",") if args.stages else None
    if wanted:
        bad = [s for s in wanted if s not in STAGES]
        if bad:
            raise SystemExit(f"--stages: unknown {bad}; stages are {list(STAGES)}")
    can_jobs = budget.jobs > 1 and not args.plan and not args.dry_run  # this checkout's compare has --jobs
    # SIGTERM (a time limit from outside) unwinds like Ctrl-C, so the running compare calls are stopped too.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if not args.plan else None
    try:
        return _main(args, argv, out_root, budget, wanted, can_jobs)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args, argv, out_root: Path, budget: Budget, wanted: list[str] | None, can_jobs: bool) -> int:
    grand = 0.0
    for name in args.studies:
        cfg = apply_sets(load_study(name, tiny=args.tiny), args.set)
        study = Study(cfg, out_root, device=args.device or ("cpu" if args.tiny else None))
        stages = [s for s in STAGES if s in cfg["stages"] and (s in wanted if wanted else s not in OPTIONAL)]
        if "variants" in stages:
            check_variant_layers(study)
        if args.plan:
            cfg["_measured"] = measured_seconds(study)
            if cfg["_measured"]:
                print(f"(study {study.name}: estimates from its finished runs: "
                      + ", ".join(f"{m} {v['per_epoch']:.1f} s/epoch + {v['eval']:.1f} s eval (n={v['n']})"
                                  for m, v in cfg["_measured"].items()) + ")")
            study.planning = True
            lines, total = plan(study, stages, budget, can_jobs=True)
            sec = cfg.get("seconds", {})
            print(f"\nstudy {study.name}: {cfg.get('description', '')}")
            print(f"  estimate: one run = {sec.get('fixed', 5)} s + {sec.get('per_epoch', 5)} s/epoch, Flat x{sec.get('flat_cost', 1.15)}; "
                  f"jobs {budget.jobs}, parallel efficiency {budget.efficiency}, {budget.call_overhead_s:.0f} s per compare call")
            print(f"  {'stage':10s} {'runs':>5s} {'done':>5s} {'s/run':>9s} {'calls':>6s} {'wall s':>9s}")
            for ln in lines:
                print("  " + ln)
            print(f"  {'total':10s} {'':5s} {'':5s} {'':9s} {'':6s} {total:9.0f}")
            grand += total
            continue
        print(f"== study {study.name} -> {study.dir}", flush=True)
        record_invocation(study, argv if argv is not None else sys.argv[1:], dry_run=args.dry_run)
        for stage in stages:
            if stage == "sharpness":
                summary = sharpness_stage(study, budget, log=lambda s: print(s, flush=True), dry_run=args.dry_run)
                print(f"-- {stage}: " + ("no runs measured yet" if summary is None else
                                         f"{len(summary['seeds'])} paired seeds -> {study.dir / stage / 'summary.json'}"), flush=True)
                continue
            seen: set[str] = set()
            while True:  # a second round only where the first made new calls possible (sam: the equal-time budget)
                cfg["_measured"] = measured_seconds(study)  # budget decisions use the measured speed once there is one
                calls, pending = study.calls(stage, block_runs=2 * budget.jobs)
                if pending:
                    print(f"-- {stage}: waits for the choice of {', '.join(pending)} (run that stage to completion first); "
                          "skipped", flush=True)
                    break
                new = [c for c in calls if label(c) not in seen]
                if not new:
                    break
                seen |= {label(c) for c in new}
                print(f"-- {stage}: {sum(len(c.run_names()) for c in new)} runs in {len(new)} compare call(s)", flush=True)
                run_calls(new, budget, can_jobs=can_jobs, log=lambda s: print(s, flush=True), dry_run=args.dry_run)
            if stage == "sam" and not pending:
                for m in study.stage_cfg("sam")["methods"]:
                    t = study.sam_timing(m)
                    print(f"   {m} at equal wall-clock: " + (
                        f"{t['max_steps']} steps (scale {t['scale']:.3f} = Flat-LoRA {t['flat_seconds']:.1f} s / "
                        f"{m} {t['sam_seconds']:.1f} s per run at {t['sam_steps']:.0f} steps; sam/timing.json)" if t else
                        "waits for Flat-LoRA's training seconds (main's flat-lora runs at this rank) and every "
                        f"equal-steps seed of {m}"), flush=True)
            summary = study.summarize(stage)
            if summary is None:
                print(f"   no finished runs in {stage}", flush=True)
            elif stage in COMPARISONS and not any(c["n"] for c in summary.get("cells", [])):
                print(f"   no run of {stage} finished (reasons in {study.dir / stage / 'summary.md'}); the study goes on",
                      flush=True)
            elif summary.get("choice"):
                ch = summary["choice"]
                print(f"   chosen {ch['point']} ({ch['metric']} {100 * ch['mean']:.2f})"
                      + ("" if ch.get("has_headroom", True) else "  WARNING: no level has headroom"), flush=True)
            elif stage not in (*COMPARISONS, "sam"):
                print(f"   incomplete: no choice yet (later stages wait)", flush=True)
    if args.plan:
        print(f"\nall studies: ~{grand:.0f} s of device time with --jobs {budget.jobs}")
    if args.pack:
        print(f"packed {pack(out_root, [load_study(n, args.tiny)['study'] for n in args.studies], Path(args.pack))}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing
    sys.exit(main())
