"""`flatlora landscape`: loss surfaces and sharpness of the merged weights of finished runs.

    flatlora landscape runs/demo/lora-r8-s0 runs/demo/flat-lora-r8-s0 --out landscape/
    flatlora landscape --task rt-sentiment --model minilm --adapter lora_adapter/ --adapter flat_adapter/
    flatlora landscape --from-json landscape/landscape.json --out landscape/   # redraw the figures, no model

For each model: a 2-D surface (default 11×11 over [−0.5, 0.5], as in the paper's Fig. 3), a 1-D curve and
the sharpness numbers (flatlora.analysis), all on one fixed set of training batches and the same seeded
filter-normalised directions, so the models are compared on equal terms. Writes into --out:
surfaces.png (with the difference of each model from the first), curves.png, sharpness.png (differences
from the first model with 95 % intervals; 2+ models), sharpness.md, landscape.json (everything, with the
command). `--from-json` redraws the figures and sharpness.md from a landscape.json alone.

What a run folder must hold (see `load_run`): config.yaml and metrics.json as `flatlora run` writes
them, plus the trained weights, either `weights.safetensors` (every trainable parameter and floating
buffer, keyed by the PEFT model's state_dict names) or `adapter/` (PEFT `save_pretrained`, which
includes modules_to_save heads). The frozen base is rebuilt from the config exactly as the runner built it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Training-data order reserved for the analysis batches: never an epoch of a run (the runner uses
# epochs 0.., LORA_GA 1_000_000, calibration 1_000_001).
LANDSCAPE_EPOCH = 1_000_002
WEIGHT_FILES = ("weights.safetensors", "adapter")


@dataclass
class LoadedRun:
    model: nn.Module
    task: Any
    label: str
    source: str
    record: dict


def load_run(run_dir: str | Path, device: str = "cpu", task=None) -> LoadedRun:
    """The trained model of a `flatlora run` results folder, and its task.

    Rebuilds the base and the adapter from config.yaml with the runner's own builder (same seed, so the
    frozen weights and any untrained init are the ones the run had), then loads the trained weights from
    `weights.safetensors` or `adapter/`. Raises ValueError naming what is missing."""
    from ..experiments.methods import get_method
    from ..experiments.runner import _build
    from ..experiments.spec import load_spec
    from ..experiments.tasks import create_task

    run_dir = Path(run_dir)
    cfg, metrics = run_dir / "config.yaml", run_dir / "metrics.json"
    if not cfg.exists() or not metrics.exists():
        raise ValueError(f"{run_dir} is not a finished `flatlora run` folder (needs config.yaml and metrics.json)")
    if not any((run_dir / f).exists() for f in WEIGHT_FILES):
        raise ValueError(f"{run_dir} has no trained weights: the landscape needs {' or '.join(WEIGHT_FILES)} "
                         "in the run folder (trainable parameters + floating buffers as safetensors, or a PEFT "
                         "save_pretrained folder); or pass --model/--adapter")
    spec = load_spec(str(cfg), [])
    record = json.loads(metrics.read_text())
    task = task or create_task(spec.task, model=spec.model, **spec.task_args)
    method = get_method(record.get("method", spec.method))
    rank, seed = int(record.get("rank", spec.lora.r)), int(record.get("seed", spec.seed))
    model = _build(spec, method, rank, seed, task, torch.device(device))
    _load_weights(model, run_dir)
    label = f"{method.name} r={rank}" + (f" seed={seed}" if seed else "")
    return LoadedRun(model.eval(), task, label, str(run_dir), record)


def _load_weights(model: nn.Module, run_dir: Path) -> None:
    f = run_dir / "weights.safetensors"
    if f.exists():
        from safetensors.torch import load_file

        state = load_file(str(f))
        missing = set(state) - set(model.state_dict())
        if missing:
            raise ValueError(f"{f}: {len(missing)} tensors do not belong to the rebuilt model, e.g. {sorted(missing)[:3]}")
        model.load_state_dict(state, strict=False)
        return
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    res = set_peft_model_state_dict(model, load_peft_weights(str(run_dir / "adapter")))
    if getattr(res, "unexpected_keys", None):
        raise ValueError(f"{run_dir / 'adapter'}: unexpected keys {res.unexpected_keys[:3]}")


def load_explicit(task_name: str, model_ref: str | None, adapter: str, task_args: dict | None = None,
                  task=None) -> LoadedRun:
    """A base model of task `task_name` (model_ref: registry name, folder or hub id) with a PEFT adapter folder."""
    from peft import PeftModel

    from ..experiments.tasks import create_task

    task = task or create_task(task_name, model=model_ref, **(task_args or {}))
    base = task.build_model()
    model = PeftModel.from_pretrained(base, adapter)
    return LoadedRun(model.eval(), task, Path(adapter).name, adapter, {})


def analysis_batches(task, n_batches: int, batch_size: int, seed: int) -> list:
    """The fixed evaluation set: the first `n_batches` training batches of a reserved, seeded order."""
    return [b for _, b in zip(range(n_batches), task.batches(batch_size, seed, LANDSCAPE_EPOCH))]


def _loss_and_accuracy(task, batches):
    """Closure model -> tensor([loss, accuracy]) from one forward pass per batch, when batches carry `labels`
    and the model returns `.logits` (classification); None otherwise (then only the loss is drawn)."""
    if not all(isinstance(b, dict) and "labels" in b for b in batches):
        return None
    from torch.nn import functional as F

    def both(model):
        loss, hits, total = 0.0, 0, 0
        for b in batches:
            logits = getattr(model(**{k: v for k, v in b.items() if k != "labels"}), "logits", None)
            if logits is None or logits.dim() != 2:
                return None
            loss = loss + F.cross_entropy(logits.float(), b["labels"])
            hits += int((logits.argmax(-1) == b["labels"]).sum())
            total += len(b["labels"])
        return torch.stack([loss / len(batches), torch.tensor(hits / total)])

    return both


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("landscape", help="loss surfaces and sharpness of the merged weights of runs",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="*", help="results folders of `flatlora run` (with saved weights)")
    p.add_argument("--from-json", metavar="LANDSCAPE_JSON", help="redraw the figures of a finished landscape.json "
                   "into --out (no model is loaded)")
    p.add_argument("--task", help="task of --adapter models (`flatlora tasks`)")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE", help="task option (repeatable)")
    p.add_argument("--model", help="base model of --adapter models (default: the task's)")
    p.add_argument("--adapter", action="append", default=[], help="PEFT adapter folder (repeatable)")
    p.add_argument("--label", action="append", default=[], help="legend label per model, in order (repeatable)")
    p.add_argument("--out", default="landscape", help="output folder (default: ./landscape)")
    p.add_argument("--steps", type=int, default=11, help="grid points per axis (paper: 11)")
    p.add_argument("--span", type=float, default=0.5, help="grid over [-span, span] (paper: 0.5)")
    p.add_argument("--curve-steps", type=int, default=21, help="points of the 1-D curve (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the directions, noise and batch order")
    p.add_argument("--scope", default="lora", choices=["lora", "matrices", "all"], help="which weights move")
    p.add_argument("--batches", type=int, default=4, help="evaluation batches (fixed training batches)")
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.05, 0.1], help="σ's of the expected sharpness")
    p.add_argument("--samples", type=int, default=16, help="Monte Carlo draws per σ")
    p.add_argument("--rho", type=float, default=0.05, help="worst-case ball radius (relative; 0: skip)")
    p.add_argument("--ball", default="filter", choices=["filter", "global"], help="worst-case ball")
    p.add_argument("--ascent-steps", type=int, default=5, help="projected ascent steps")
    p.add_argument("--no-hessian", action="store_true", help="skip λ_max and the trace")
    p.add_argument("--power-iters", type=int, default=20, help="power iterations for λ_max")
    p.add_argument("--trace-probes", type=int, default=10, help="Hutchinson probes for the trace")
    p.add_argument("--hvp", default="auto", choices=["auto", "double", "fd"], help="Hessian-vector products")
    p.add_argument("--vmax", type=float, help="cap of the shared colour scale (default: the largest loss)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--title", help="figure title")
    p.set_defaults(fn=run)
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
    import yaml

    from ..analysis import eval_mode, loss_landscape, mean_over, sharpness_report
    if args.from_json:
        if args.run_dirs or args.adapter:
            raise ValueError("--from-json redraws a finished landscape.json: give no RUN_DIR or --adapter with it")
        return replot(args.from_json, args.out, vmax=args.vmax, title=args.title)
    if not args.run_dirs and not args.adapter:
        raise ValueError("give RUN_DIR(s) of `flatlora run`, or --task and --adapter folder(s)")
    if args.adapter and not args.task:
        raise ValueError("--adapter needs --task (which data and loss to use)")
    if args.threads:
        torch.set_num_threads(args.threads)
    task_args = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.task_arg)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    loaded: list[LoadedRun] = []
    for d in args.run_dirs:
        loaded.append(load_run(d, device=args.device, task=loaded[-1].task if _same_task(loaded, d) else None))
    explicit_task = None  # every --adapter shares --task/--model: tokenise the data once
    for a in args.adapter:
        loaded.append(load_explicit(args.task, args.model, a, task_args, task=explicit_task))
        explicit_task = loaded[-1].task
    labels = args.label + [r.label for r in loaded[len(args.label):]]
    if len(set(labels)) != len(labels):
        labels = [f"{lab} [{i}]" for i, lab in enumerate(labels)]

    surfaces, curves, reports, records = {}, {}, {}, {}
    for run_, label in zip(loaded, labels):
        model = run_.model.to(args.device)
        batches = [_to(b, args.device) for b in analysis_batches(run_.task, args.batches, args.batch_size, args.seed)]
        loss_fn = mean_over(batches, run_.task.loss)
        # Classification: loss and accuracy from one forward per point, if it reproduces the task's own loss.
        both = _loss_and_accuracy(run_.task, batches)
        with torch.no_grad(), eval_mode(model):
            if both is not None and (both(model) is None or abs(float(both(model)[0]) - float(loss_fn(model))) > 1e-4):
                both = None
        surface_fn = both or loss_fn
        t0 = time.time()
        _log(f"[{label}] 2-D surface {args.steps}x{args.steps} over ±{args.span} ...")
        surfaces[label] = loss_landscape(model, surface_fn, dims=2, steps=args.steps, span=args.span,
                                         seed=args.seed, scope=args.scope)
        if args.curve_steps:
            curves[label] = loss_landscape(model, surface_fn, dims=1, steps=args.curve_steps,
                                           span=args.span, seed=args.seed, scope=args.scope)
        _log(f"[{label}] sharpness ...")
        reports[label] = sharpness_report(model, loss_fn, sigmas=args.sigmas, n_samples=args.samples, rho=args.rho,
                                          ball=args.ball, ascent_steps=args.ascent_steps, hessian=not args.no_hessian,
                                          power_iters=args.power_iters, trace_probes=args.trace_probes, hvp=args.hvp,
                                          seed=args.seed, scope=args.scope)
        records[label] = {"source": run_.source, "run": {k: run_.record.get(k) for k in ("method", "rank", "seed", "metrics")},
                          "seconds": round(time.time() - t0, 1)}
        _log(f"[{label}] done in {records[label]['seconds']} s")

    title = args.title or f"loss of W' = W + sBA along 2 filter-normalised directions (seed {args.seed}, scope {args.scope})"
    paired = _paired(reports, labels)
    md = _sharpness_md(reports, paired, labels)
    files = _draw(out, surfaces, curves, reports, md, title=title, vmax=args.vmax)
    payload = {"argv": sys.argv,
               "settings": {k: v for k, v in vars(args).items() if k != "fn"},
               "models": {lab: {**records[lab], "surface": surfaces[lab].to_dict(),
                                "curve": curves[lab].to_dict() if lab in curves else None,
                                "sharpness": reports[lab].to_dict()} for lab in labels},
               "paired_expected_sharpness": paired, "files": files}
    (out / "landscape.json").write_text(json.dumps(payload, indent=1, default=str))
    print(md)
    print(f"wrote {', '.join(sorted(set(files.values())))}, landscape.json in {out}/")
    return 0


def _sharpness_md(reports, paired, labels) -> str:
    """The sharpness table of every model, then the paired differences against the first."""
    from ..analysis.plot import sharpness_markdown

    md = sharpness_markdown(reports)
    if paired:
        md += "\n\nExpected sharpness, paired over the same noise draws, vs " + labels[0] + " (mean ± 95% CI):\n\n"
        md += "\n".join(f"- {lab}, σ={p['sigma']:g}: {p['difference']:+.3g} ± {p['ci95']:.2g}"
                        for lab, rows in paired.items() for p in rows)
    return md


def _draw(out: Path, surfaces, curves, reports, md: str, *, title: str, vmax=None) -> dict[str, str]:
    """surfaces.png, curves.png, sharpness.png (2+ models) and sharpness.md (`md`) in `out`; returns their names."""
    from ..analysis.plot import plot_curves, plot_sharpness, plot_surfaces

    files = {"surfaces": plot_surfaces(surfaces, out / "surfaces.png", title=title, vmax=vmax).name}
    if len(reports) >= 2:
        files["sharpness_png"] = plot_sharpness(reports, out / "sharpness.png").name
    if curves:
        files["curves"] = plot_curves(curves, out / "curves.png", title=title).name
    (out / "sharpness.md").write_text(md + "\n")
    files["sharpness_md"] = "sharpness.md"
    return files


def replot(json_path: str | Path, out: str | Path, *, vmax: float | None = None, title: str | None = None) -> int:
    """Redraw the figures and sharpness.md of a landscape.json (from `flatlora landscape`) into `out`."""
    from ..analysis import LandscapeResult, SharpnessResult

    json_path, out = Path(json_path), Path(out)
    try:
        payload = json.loads(json_path.read_text())
        models = payload["models"]
        surfaces = {lab: LandscapeResult.from_dict(m["surface"]) for lab, m in models.items()}
        curves = {lab: LandscapeResult.from_dict(m["curve"]) for lab, m in models.items() if m.get("curve")}
        reports = {lab: SharpnessResult.from_dict(m["sharpness"]) for lab, m in models.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{json_path} is not a landscape.json of `flatlora landscape` ({type(e).__name__}: {e})") from None
    settings = payload.get("settings", {})
    title = title or settings.get("title") or (f"loss of W' = W + sBA along 2 filter-normalised directions "
                                               f"(seed {settings.get('seed', 0)}, scope {settings.get('scope', 'lora')})")
    out.mkdir(parents=True, exist_ok=True)
    labels = list(models)
    files = _draw(out, surfaces, curves, reports, _sharpness_md(reports, _paired(reports, labels), labels), title=title,
                  vmax=vmax if vmax is not None else settings.get("vmax"))
    print(f"redrew {', '.join(sorted(set(files.values())))} in {out}/ from {json_path}")
    return 0


def _paired(reports, labels) -> dict[str, list]:
    """Expected-sharpness differences of every model against the first, paired draw by draw (same seed)."""
    from ..analysis.sharpness import paired_difference

    first = reports[labels[0]].expected
    out = {}
    for lab in labels[1:]:
        rows = reports[lab].expected
        if [r["sigma"] for r in rows] == [r["sigma"] for r in first]:
            out[lab] = [paired_difference(a, b) for a, b in zip(first, rows)]
    return out


def _same_task(loaded: list[LoadedRun], run_dir: str) -> bool:
    """Reuse the task (tokenised data) of the previous run when the configs ask for the same task and data."""
    if not loaded or not (Path(loaded[-1].source) / "config.yaml").exists():
        return False
    import yaml

    keys = ("task", "task_args", "model")
    a = yaml.safe_load((Path(loaded[-1].source) / "config.yaml").read_text())
    b = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    return all(a.get(k) == b.get(k) for k in keys)


def _to(batch, device):
    from ..experiments.tasks.base import to_device

    return to_device(batch, device)
