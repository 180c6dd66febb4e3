"""Train and evaluate one (task, method, rank, seed) and write its results folder.

The loop is the same for every method; a method only changes how the model is wrapped (PEFT variant or
full fine-tuning), which optimizer is built, and how one update's gradients are made:

    plain      : backward over the accumulation window
    Flat-*     : the same inside `with flat.step(t)` (noise on W for the window, removed before the update)
    SAM (ab/w) : two passes, the second at the SAM neighbour (flatlora.baselines.sam)

Pairing: the run seeds torch's global RNG before the model is built, so new heads and LoRA A matrices
start equal across methods for one seed, and the data order comes from a private generator (Task.batches).

Results folder (written as `<dir>.partial`, renamed when complete, so a finished folder is never half-written):
    config.yaml   the resolved spec of this run     metrics.json  final metrics, time, steps, status
    curve.csv     step, epoch, loss, lr, sigma_t    env.json      seed, versions, device, git commit
    weights.safetensors  trainable parameters + floating buffers (what `flatlora landscape RUN_DIR` loads)
    split.json    example ids of each split
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from ..core import batchnorm
from .methods import Method, create_optimizer, get_method, lora_config, prepare_model
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
    key["lora"] = {k: v for k, v in key["lora"].items() if k != "r"}
    key["train"] = {k: v for k, v in key["train"].items() if k not in ("threads", "device", "eval_batch_size")}
    return key


def total_steps(spec: ExperimentSpec, num_train: int) -> int:
    t = spec.train
    per_epoch = math.ceil(math.ceil(num_train / t.batch_size) / t.grad_accum)
    steps = max(1, math.ceil(per_epoch * t.epochs))
    return min(steps, t.max_steps) if t.max_steps else steps


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        p = (step - warmup) / max(1, total - warmup)
        return {"cosine": 0.5 * (1 + math.cos(math.pi * p)), "linear": 1 - p, "constant": 1.0}[kind]
    return f


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is visible: use train.device=cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    # The runner is the experiment's driver, not library code: seeding the global RNGs here is what
    # makes the model init (new head, LoRA A) the same for every method of one seed.
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _build(spec: ExperimentSpec, method: Method, rank: int, seed: int, task: Task, device: torch.device):
    seed_everything(seed)
    model = task.build_model()
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


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for mod in ("torch", "transformers", "peft", "flatlora", "scipy", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001  (a missing optional package is just not recorded)
            pass
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return out


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """What the run changed: trainable parameters and floating buffers (BatchNorm statistics), keyed as in
    the model's state_dict. The frozen base is rebuilt from config.yaml (`flatlora landscape` does)."""
    from safetensors.torch import save_file

    params = dict(model.named_parameters())
    # clone(): tied weights (T5's shared embeddings) are one storage under several names, which
    # safetensors refuses to write.
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
             if (k in params and params[k].requires_grad) or (k not in params and v.is_floating_point())}
    save_file(state, str(path))


def run_one(spec: ExperimentSpec, run_dir: str | Path, *, method: str | None = None, seed: int | None = None,
            rank: int | None = None, task: Task | None = None, progress: bool = True) -> dict[str, Any]:
    """Train + evaluate one run and write `run_dir`; returns the metrics record.

    Args:
        method, seed, rank: default to spec.method, spec.seed, spec.lora.r.
        task: a task already built from `spec` (compare builds it once for all runs).
    """
    m = get_method(method or spec.method)
    seed = spec.seed if seed is None else seed
    rank = rank or spec.lora.r
    run_dir = Path(run_dir)
    if (run_dir / "metrics.json").exists():
        raise FileExistsError(f"{run_dir} holds finished results; it is never overwritten (use another out_dir)")
    t = spec.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = resolve_device(t.device)
    task = task or create_task(spec.task, model=spec.model, **spec.task_args)
    model = _build(spec, m, rank, seed, task, device)

    steps = total_steps(spec, task.num_train())
    lr = t.full_lr if m.full else t.lr
    opt = create_optimizer(m, model, lr=lr, weight_decay=t.weight_decay, loraplus_ratio=spec.lora.loraplus_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.scheduler, int(t.warmup_ratio * steps), steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    flat = sam = None
    if m.flat:
        from ..core.engine import FlatLoRA

        flat = FlatLoRA(model, spec.flat_config(steps, seed, **({"target": "linear"} if m.full else {})))
    if m.sam == "ab":
        from ..baselines.sam import LoRASAM

        sam = LoRASAM(trainable, rho=spec.sam_rho_ab)
    elif m.sam == "w":
        from ..baselines.sam import MergedWeightSAM

        sam = MergedWeightSAM(model, rho=spec.sam_rho_w)

    partial = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted attempt: start it over
    partial.mkdir(parents=True)
    curve_f = open(partial / "curve.csv", "w", newline="")
    curve = csv.writer(curve_f)
    curve.writerow(["step", "epoch", "loss", "lr", "sigma", "seconds"])
    bar = _progress(steps, f"{m.name} r={rank} seed={seed}", progress)
    start = time.time()
    step, epoch, window = 0, 0, []
    try:
        while step < steps:
            for batch in task.batches(t.batch_size, seed, epoch, device):
                window.append(batch)
                if len(window) < t.grad_accum:
                    continue
                loss = _update(task, model, window, flat, sam, trainable, step)
                if t.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step}: lower train.lr")
                sigma = flat.sigma_at(step) if flat else 0.0
                curve.writerow([step, epoch, f"{loss:.6f}", f"{sched.get_last_lr()[0]:.3e}", f"{sigma:.5f}",
                                f"{time.time() - start:.2f}"])
                if step % 20 == 0:
                    curve_f.flush()  # a long run can be watched (tail -f curve.csv) while it trains
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", sigma=f"{sigma:.3f}")
                window, step = [], step + 1
                if step >= steps:
                    break
            epoch += 1
    finally:
        bar.close()
        curve_f.close()
    train_seconds = time.time() - start
    # BatchNorm models: every method gets its running statistics recomputed from clean forward passes
    # over the same training batches. Flat-LoRA needs it (its statistics were frozen while noise was on);
    # doing it for the baselines too keeps the comparison fair (a short run with BN momentum 0.01 would
    # otherwise leave them with the pretraining statistics).
    recalibrated = 0
    if batchnorm.batchnorm_layers(model):
        batches = (b for _, b in zip(range(20), task.batches(t.batch_size, seed, CALIBRATION_EPOCH, device)))
        recalibrated = flat.recalibrate_batchnorm(batches) if flat is not None else batchnorm.recalibrate(model, batches)
    if flat is not None:
        flat.close()
    model.eval()
    metrics = task.evaluate(model, t.eval_batch_size)
    record = {"status": "done", "task": spec.task, "method": m.name, "rank": rank, "seed": seed,
              "metrics": metrics, "primary_metric": task.primary_metric, "steps": steps,
              "train_seconds": round(train_seconds, 2), "eval_seconds": round(time.time() - start - train_seconds, 2),
              "trainable_params": sum(p.numel() for p in trainable), "bn_recalibrated_batches": recalibrated,
              "flatlora_mode": getattr(flat, "mode", None), "run_key": run_key(spec)}
    run_spec = spec.to_dict() | {"method": m.name, "seed": seed, "lora": spec.to_dict()["lora"] | {"r": rank}}
    _write_yaml(partial / "config.yaml", run_spec, f"# flatlora run {Path(run_dir)/'config.yaml'}  (re-runs this run)\n")
    (partial / "env.json").write_text(json.dumps({"seed": seed, "device": str(device), "threads": torch.get_num_threads(),
                                                  "task": task.describe(), **versions()}, indent=1, default=str))
    (partial / "split.json").write_text(json.dumps(task.split_record()))
    save_weights(model, partial / "weights.safetensors")
    (partial / "metrics.json").write_text(json.dumps(record, indent=1, default=str))  # last: marks completion
    if run_dir.exists():  # a folder without metrics.json: debris of an older layout or a crash
        shutil.rmtree(run_dir)
    os.replace(partial, run_dir)
    return record


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


def _write_yaml(path: Path, data: dict, header: str = "") -> None:
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False)
