"""Train and evaluate one (task, method, rank, seed) and write its results folder.

The loop is the same for every method; a method only changes how the model is wrapped (PEFT variant or
full fine-tuning), which optimizer is built, and how one update's gradients are made:

    plain      : backward over the accumulation window
    Flat-*     : the same inside `with flat.step(t)` (noise on W for the window, removed before the update)
    SAM (ab/w) : two passes, the second at the SAM neighbour (flatlora.baselines.sam)

Pairing: the run seeds the global RNGs (`transformers.set_seed`) before the model is built, so new heads
and LoRA A matrices start equal across methods for one seed, and the data order comes from a private
generator (Task.batches). Neither depends on the process a run trains in (`compare --jobs`).

Divergence is a result, not a success: a non-finite loss stops training, and the trained tensors and the
evaluation outputs are checked to be finite; a run that fails a check is saved with `status: failed` and
the reason (no weights), never with the accuracy of a NaN model.

Results folder (written as `<dir>.partial`, renamed when complete, so a finished folder is never half-written):
    config.yaml   the resolved spec of this run     metrics.json  status, metrics, time, steps, input fingerprints
    curve.csv     step, epoch, loss, lr, sigma_t    env.json      seed, versions, device, git commit
    weights.safetensors  trainable parameters + floating buffers (what `flatlora landscape RUN_DIR` loads)
    split.json    example ids of each split         tb/           TensorBoard events (when tensorboard is installed)
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core import batchnorm
from .methods import Method, create_optimizer, get_method, lora_config, prepare_model
from .provenance import task_inputs
from .quant import check_quantization
from .spec import ExperimentSpec
from .tasks import create_task
from .tasks.base import Task

# Data orders outside the training epochs, so they never coincide with an epoch of the run.
LORA_GA_EPOCH, CALIBRATION_EPOCH = 1_000_000, 1_000_001
RUN_FIELDS = ("task", "task_args", "model", "lora", "train", "flat", "sam_rho_ab", "sam_rho_w")  # what makes two runs comparable


def run_key(spec: ExperimentSpec) -> dict[str, Any]:
    """The part of a spec that a finished run's results depend on (besides method, rank and seed)."""
    d = spec.to_dict()
    key = {k: d[k] for k in RUN_FIELDS}
    if spec.quant.type is not None:  # only then: the keys of runs made before `quant` existed stay valid
        key["quant"] = d["quant"]
    key["lora"] = {k: v for k, v in key["lora"].items() if k != "r"}
    key["train"] = {k: v for k, v in key["train"].items() if k not in ("threads", "device", "eval_batch_size")}
    return key


def total_steps(spec: ExperimentSpec, num_train: int) -> int:
    t = spec.train
    per_epoch = math.ceil(math.ceil(num_train / t.batch_size) / t.grad_accum)
    steps = max(1, math.ceil(per_epoch * t.epochs))
    return min(steps, t.max_steps) if t.max_steps else steps


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is visible: use train.device=cpu")
    return torch.device(name)


@dataclass
class _Run:
    """Everything the loop of one run needs, built by `_setup`."""

    spec: ExperimentSpec
    method: Method
    rank: int
    seed: int
    task: Task
    device: torch.device
    model: torch.nn.Module
    steps: int
    opt: torch.optim.Optimizer
    sched: Any
    trainable: list
    flat: Any = None
    sam: Any = None


def run_one(spec: ExperimentSpec, run_dir: str | Path, *, method: str | None = None, seed: int | None = None,
            rank: int | None = None, task: Task | None = None, inputs: dict | None = None, progress: bool = True,
            position: int = 0) -> dict[str, Any]:
    """Train + evaluate one run and write `run_dir`; returns the metrics record (`status` done or failed).

    Args:
        method, seed, rank: default to spec.method, spec.seed, spec.lora.r.
        task: a task already built from `spec` (compare builds it once for all runs), and `inputs` its
            fingerprint (`provenance.task_inputs`, taken when it was built); both built here when None.
        position: line of the progress bar (one per parallel job).
    """
    m = get_method(method or spec.method)
    seed = spec.seed if seed is None else seed
    rank = spec.lora.r if rank is None else rank
    for name, value, lo in (("seed", seed, 0), ("rank", rank, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists():
        raise FileExistsError(f"{run_dir} holds finished results; it is never overwritten (use another out_dir)")
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    device = resolve_device(spec.train.device)
    if task is None:
        task = create_task(spec.task, model=spec.model, **spec.task_args)
    check_quantization(spec, task)
    if inputs is None:
        inputs = task_inputs(spec.task, spec.task_args, task)
    run = _setup(spec, m, rank, seed, task, device)
    partial = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted attempt: start it over
    partial.mkdir(parents=True)
    start = time.time()
    failure = _train(run, _Log(partial, run, progress, position))
    train_seconds = time.time() - start
    recalibrated = _recalibrate_bn(run) if failure is None else 0
    if run.flat is not None:
        run.flat.close()
    failure = failure or _nonfinite_state(run)
    metrics, failure = _evaluate(run) if failure is None else ({}, failure)
    untrusted = {} if failure is None else metrics  # the metrics of a diverged model: kept for a post-mortem only
    record = {"status": "done" if failure is None else "failed", "failure": failure, "task": spec.task,
              "method": m.name, "rank": rank, "seed": seed, "metrics": {} if failure else metrics,
              "untrusted_metrics": untrusted, "primary_metric": task.primary_metric,
              "steps": run.steps, "train_seconds": round(train_seconds, 2),
              "eval_seconds": round(time.time() - start - train_seconds, 2),
              "trainable_params": sum(p.numel() for p in run.trainable), "bn_recalibrated_batches": recalibrated,
              "flatlora_mode": getattr(run.flat, "mode", None), "run_key": run_key(spec), "inputs": inputs}
    _write_results(run, record, partial, run_dir)
    return record


# ---------------------------------------------------------------------- set-up
def _build(spec: ExperimentSpec, method: Method, rank: int, seed: int, task: Task, device: torch.device):
    from transformers import set_seed

    # The runner is the experiment's driver, not library code: seeding the global RNGs here is what
    # makes the model init (new head, LoRA A) the same for every method of one seed.
    set_seed(seed)
    model = task.build_model()
    if spec.quant.type is not None:
        from .quant import quantized_base

        model = quantized_base(model, spec, device)  # on the device, in train.dtype around the packed weights
    else:
        dtype = getattr(torch, spec.train.dtype)
        if dtype != torch.float32:
            model = model.to(dtype)
        model = model.to(device)
    cfg = None
    if not method.full:
        lo = spec.lora
        cfg = lora_config(method, r=rank, alpha=lo.alpha, dropout=lo.dropout,
                          targets=lo.targets if lo.targets is not None else task.default_targets,
                          modules_to_save=lo.modules_to_save if lo.modules_to_save is not None else task.default_modules_to_save,
                          task_type=task.peft_task_type)

        def grad_step(m):  # LoRA-GA: gradients of a few seeded training batches pick the init
            for i, b in enumerate(task.batches(spec.train.batch_size, seed, LORA_GA_EPOCH, device)):
                if i == 4:
                    break
                task.loss(m, b).backward()

        model = prepare_model(method, model, lora_cfg=cfg, grad_step=grad_step)
    else:
        model = prepare_model(method, model)
    return model.to(device).train()


def _setup(spec: ExperimentSpec, m: Method, rank: int, seed: int, task: Task, device: torch.device) -> _Run:
    """Model, optimizer, lr schedule (transformers.get_scheduler, warm-up rounded up as HF Trainer does),
    and the Flat-LoRA engine or SAM wrapper of the method."""
    from transformers import get_scheduler

    t = spec.train
    model = _build(spec, m, rank, seed, task, device)
    steps = total_steps(spec, task.num_train())
    opt = create_optimizer(m, model, lr=t.full_lr if m.full else t.lr, weight_decay=t.weight_decay,
                           loraplus_ratio=spec.lora.loraplus_ratio)
    sched = get_scheduler(t.scheduler, opt, num_warmup_steps=math.ceil(t.warmup_ratio * steps), num_training_steps=steps)
    run = _Run(spec, m, rank, seed, task, device, model, steps, opt, sched,
               trainable=[p for p in model.parameters() if p.requires_grad])
    if m.flat:
        from ..core.engine import FlatLoRA

        run.flat = FlatLoRA(model, spec.flat_config(steps, seed, **({"target": "linear"} if m.full else {})))
    if m.sam == "ab":
        from ..baselines.sam import LoRASAM

        run.sam = LoRASAM(run.trainable, rho=spec.sam_rho_ab)
    elif m.sam == "w":
        from ..baselines.sam import MergedWeightSAM

        run.sam = MergedWeightSAM(model, rho=spec.sam_rho_w)
    return run


# ---------------------------------------------------------------------- the loop
class _Log:
    """What one run reports per step: curve.csv, TensorBoard events (when installed), the progress bar."""

    def __init__(self, folder: Path, run: _Run, progress: bool, position: int):
        from tqdm import tqdm

        self.file = open(folder / "curve.csv", "w", newline="")
        self.csv = csv.writer(self.file)
        self.csv.writerow(["step", "epoch", "loss", "lr", "sigma", "seconds"])
        self.tb = _summary_writer(folder / "tb") if run.spec.tensorboard else None
        self.bar = tqdm(total=run.steps, desc=f"{run.method.name} r={run.rank} seed={run.seed}", disable=not progress,
                        position=position, leave=False, dynamic_ncols=True, file=sys.stderr)
        self.start = time.time()

    def step(self, step: int, epoch: int, loss: float, lr: float, sigma: float) -> None:
        self.csv.writerow([step, epoch, f"{loss:.6f}", f"{lr:.6e}", f"{sigma:.5f}", f"{time.time() - self.start:.2f}"])
        if step % 20 == 0:
            self.file.flush()  # a long run can be watched (tail -f curve.csv) while it trains
        if self.tb is not None:
            for name, v in (("train/loss", loss), ("train/sigma", sigma), ("train/lr", lr)):
                self.tb.add_scalar(name, v, step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", sigma=f"{sigma:.3f}")

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _summary_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: curve.csv holds the same numbers
        return None
    return SummaryWriter(log_dir=str(path))


def _train(run: _Run, log: _Log) -> str | None:
    """The optimizer steps of the run; returns why it diverged, or None."""
    t = run.spec.train
    step, epoch, window = 0, 0, []
    try:
        while step < run.steps:
            for batch in run.task.batches(t.batch_size, run.seed, epoch, run.device):
                window.append(batch)
                if len(window) < t.grad_accum:
                    continue
                lr = run.opt.param_groups[0]["lr"]  # the lr this update uses (the schedule steps after it)
                loss = _update(run.task, run.model, window, run.flat, run.sam, run.trainable, step)
                sigma = run.flat.sigma_at(step) if run.flat else 0.0
                log.step(step, epoch, loss, lr, sigma)
                if not math.isfinite(loss):
                    run.opt.zero_grad(set_to_none=True)
                    if step == 0:  # no update yet (and sigma_0 = 0): no lr or clipping can be the cause
                        return (f"diverged: the loss became {loss} at step 0, before any update: the untrained "
                                f"model's forward is non-finite{_first_nonfinite(run, window[0])}; check the base "
                                "weights and lora.targets")
                    return (f"diverged: the loss became {loss} at step {step} (lr {lr:.3g}); lower train.lr "
                            "or set train.max_grad_norm")
                if t.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(run.trainable, t.max_grad_norm)
                run.opt.step()
                run.sched.step()
                run.opt.zero_grad(set_to_none=True)
                window, step = [], step + 1
                if step >= run.steps:
                    break
            epoch += 1
    finally:
        log.close()
    return None


def _first_nonfinite(run: _Run, batch: Any) -> str:
    """Where a forward first goes non-finite: the batch itself, or the first module (in completion order, so
    the innermost) whose output holds nan/inf, e.g. ' (first at base_model.model.x.conv, a lora Conv2d)'."""
    if any(not bool(torch.isfinite(t).all()) for _, t in _float_tensors(batch, "batch")):
        return " (the training batch itself holds nan/inf)"
    found: list[str] = []

    def hook(name):
        def check(module, args, output):
            if not found and any(not bool(torch.isfinite(t).all()) for _, t in _float_tensors(output, "output")):
                kind = type(module).__name__
                found.append(f" (first at {name}, a {'lora ' if module.__module__.startswith('peft.') else ''}{kind})")
        return check

    hooks = [m.register_forward_hook(hook(n)) for n, m in run.model.named_modules() if n]
    try:
        with torch.no_grad():
            run.task.loss(run.model, batch)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else ""


def _update(task: Task, model, window: list, flat, sam, trainable, step: int) -> float:
    """Accumulate the gradients of one optimizer step; returns the mean loss of the window."""
    losses = []

    def closure():
        losses.clear()
        for b in window:
            loss = task.loss(model, b) / len(window)
            loss.backward()
            losses.append(loss.item())

    if sam is not None:
        sam.step(closure, zero=trainable)
    elif flat is not None:
        with flat.step(step):
            closure()
    else:
        closure()
    return sum(losses)


# ---------------------------------------------------------------------- after training
def _recalibrate_bn(run: _Run) -> int:
    """BatchNorm models: every method gets its running statistics recomputed from clean forward passes over
    the same training batches. Flat-LoRA needs it (its statistics were frozen while noise was on); doing
    it for the baselines too keeps the comparison fair (a short run with BN momentum 0.01 would otherwise
    leave them with the pretraining statistics). Returns the number of batches used (0: no BatchNorm)."""
    if not batchnorm.batchnorm_layers(run.model):
        return 0
    t = run.spec.train
    batches = (b for _, b in zip(range(20), run.task.batches(t.batch_size, run.seed, CALIBRATION_EPOCH, run.device)))
    if run.flat is not None:
        return run.flat.recalibrate_batchnorm(batches)
    return batchnorm.recalibrate(run.model, batches)


def _saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the run changed: trainable parameters and floating buffers (BatchNorm statistics), keyed as in
    the model's state_dict. The extra state_dict entries of a quantized base (4-bit absmax / quant_map,
    8-bit SCB) are neither: they belong to the frozen base, rebuilt from config.yaml."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    return {k: v for k, v in model.state_dict().items()
            if (k in params and params[k].requires_grad) or (k in buffers and v.is_floating_point())}


def _nonfinite_state(run: _Run) -> str | None:
    state = _saved_state(run.model)
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return None
    return (f"diverged: {len(bad)} of {len(state)} trained tensors hold nan/inf after training (e.g. {bad[0]}); "
            "lower train.lr or set train.max_grad_norm")


def _evaluate(run: _Run) -> tuple[dict[str, float], str | None]:
    """The task's metrics, and why they cannot be trusted (a non-finite model output or metric), or None."""
    run.model.eval()
    bad: list[str] = []

    def check(module, args, output):  # every forward of the evaluation, generation included
        if not bad:
            for name, t in _float_tensors(output, "output"):
                if not bool(torch.isfinite(t).all()):
                    bad.append(name)
                    break

    base = run.model.get_base_model() if hasattr(run.model, "get_base_model") else run.model
    hook = base.register_forward_hook(check)
    try:
        metrics = run.task.evaluate(run.model, run.spec.train.eval_batch_size)
    finally:
        hook.remove()
    if bad:
        return metrics, f"diverged: the model's {bad[0]} held nan/inf during evaluation, so its metrics mean nothing"
    odd = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    return metrics, (f"evaluation gave non-finite {', '.join(odd)}" if odd else None)


def _float_tensors(x: Any, name: str):
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            yield name, x
    elif isinstance(x, dict):  # transformers' ModelOutput is a dict
        for k, v in x.items():
            yield from _float_tensors(v, k)
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _float_tensors(v, f"{name}[{i}]")


# ---------------------------------------------------------------------- writes
def _write_results(run: _Run, record: dict, partial: Path, run_dir: Path) -> None:
    """config.yaml, env.json, split.json, weights and the PEFT adapter folder (done runs only) and metrics.json
    (last: marks completion),
    then the atomic rename of `<run>.partial` to `<run>`."""
    spec = run.spec
    run_spec = spec.to_dict() | {"method": run.method.name, "seed": run.seed, "lora": spec.to_dict()["lora"] | {"r": run.rank}}
    (partial / "config.yaml").write_text(f"# flatlora run {run_dir / 'config.yaml'}  (re-runs this run)\n"
                                         + yaml.safe_dump(run_spec, sort_keys=False))
    (partial / "env.json").write_text(json.dumps({"seed": run.seed, "device": str(run.device), "threads": torch.get_num_threads(),
                                                  "task": run.task.describe(), **versions()}, indent=1, default=str))
    (partial / "split.json").write_text(json.dumps(run.task.split_record()))
    if record["status"] == "done":
        save_weights(run.model, partial / "weights.safetensors")
        save_adapter(run.model, run.flat, partial / "adapter")
    (partial / "metrics.json").write_text(json.dumps(record, indent=1, default=str))
    if run_dir.exists():  # a folder without metrics.json: debris of an older layout or a crash
        shutil.rmtree(run_dir)
    os.replace(partial, run_dir)


def versions() -> dict[str, str]:
    """Software and device a result came from (runs' env.json, the benchmarks' provenance)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        out["gpu"], out["cuda"] = torch.cuda.get_device_name(0), str(torch.version.cuda)
    for mod in ("torch", "triton", "transformers", "peft", "bitsandbytes", "flatlora", "scipy", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001  (a missing optional package is just not recorded)
            pass
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    # A copied working tree can carry a stale .git (the GPU machine's did): the hash of the package's own
    # sources says which code ran whatever git says.
    out["flatlora_source_sha256"] = source_hash()
    return out


def source_hash(root: Path | None = None) -> str:
    """sha256 over the flatlora package's .py files (relative path and bytes, sorted), 16 hex digits."""
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def save_adapter(model: torch.nn.Module, flat: Any, folder: Path) -> None:
    """A PEFT adapter folder (`PeftModel.from_pretrained(base, folder)` loads it) and, for Flat-* runs, the
    noise settings next to adapter_config.json (flatlora_config.json + a model-card section), so the adapter
    says how it was trained wherever it goes. Full fine-tuning has no adapter: weights.safetensors holds it."""
    if not hasattr(model, "peft_config"):
        return
    model.save_pretrained(str(folder))
    if flat is not None:
        from ..integrations.card import write_adapter_card

        write_adapter_card(folder, flat.config)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """What the run changed (`_saved_state`). The frozen base is rebuilt from config.yaml (`flatlora landscape` does)."""
    from safetensors.torch import save_file

    # clone(): tied weights (T5's shared embeddings) are one storage under several names, which
    # safetensors refuses to write.
    save_file({k: v.detach().cpu().clone() for k, v in _saved_state(model).items()}, str(path))
