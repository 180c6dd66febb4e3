"""Overhead of Flat-LoRA next to plain LoRA, the reference behaviour and SAM: one script, one GPU call.

    python benchmarks/overhead/run.py --out $OUT [--anchor .carry/anchor_overhead.py] [--only acc1,acc16,...]
    python benchmarks/overhead/run.py --smoke --out /tmp/ovh          # tiny shapes, CPU, < 30 s
    python benchmarks/overhead/run.py --out $OUT --only qlora         # QLoRA vs Flat-QLoRA (needs bitsandbytes)

Variants per setting: `lora` (plain PEFT LoRA step), `flatlora-inplace`, `flatlora-forward` (the engine,
generator=auto: Triton Philox kernels on CUDA), `reference` (the public reference code's perturb/restore,
taken from the carried anchor_overhead.py at run time and applied to this very model), `sam` (SAM on
the LoRA parameters: two forward/backward passes per step). Settings: Llama-2-7B shapes at accumulation
1 (micro 4x512) and 16 (micro 2x1024); a MiniLM-L6-shaped text classifier (batch 32x64); a size sweep
(~1B/3B/7B Llama shapes; plus two token counts at ~1B) and an exactness check (bf16/fp16 weights
bit-identical after 1000 steps, both modes). `qlora` (only when asked for): the Llama-2-7B shape with
q, k, v, o, gate, up, down in bitsandbytes NF4 (double quant, bf16 compute) through
prepare_model_for_kbit_training, plain QLoRA (`lora` rows) against Flat-QLoRA (`flatlora-forward`; in-place
is refused on a quantized base, and the refusal is recorded), micro 4x512 and 2x1024 (accumulation 16).
Median of CUDA-synchronised step times after warm-up, the variants of a setting interleaved over `--rounds`
rounds; peak memory per variant. `--control` adds `lora-again`, the LoRA step under a second name, interleaved
like the rest: its ratio to `lora` is the run's own noise floor for every ratio. `--compile BACKEND` adds
`lora-compiled`, `flatlora-inplace-compiled` and `flatlora-forward-compiled`: the same steps through
`torch.compile(model, backend=BACKEND)`, where forward mode runs as custom ops inside the graph; the Flat-LoRA ones
also carry their ratio to `lora-compiled` (`ratio_vs_lora_compiled`, with its per-round median and interval), and
with `--profile` their tables are taken against `lora-compiled`'s. Each row also gives its ratio to
LoRA round by round (`round_ratio_median`) with a 95 % bootstrap interval over the rounds (`round_ratio_ci95`, from
5 rounds up): a target is met or missed only where that interval says so. Writes overhead-<device>.json (rows + provenance) and prints a table.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import functools
import gc
import gzip
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from flatlora import FlatLoRA, FlatLoRAConfig  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {  # hidden, intermediate, layers, heads
    "llama-1b": (2048, 5632, 22, 16),
    "llama-3b": (3200, 8640, 26, 32),
    "llama-7b": (4096, 11008, 32, 32),
    "tiny": (64, 128, 2, 4),
    "tiny2": (128, 256, 2, 4),
}


# ------------------------------------------------------------------------------------ models
def build_llama(size: str, dev: str, vocab: int, nf4: bool = False):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    h, inter, nl, heads = SIZES[size]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=nl, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02, generator=g)
    if nf4:
        model = quantize_nf4(model, dev, compute_dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=PROJ, lora_dropout=0.0))
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, LoraLayer) and "default" in mod.lora_A:  # lora.Linear and lora.bnb.Linear4bit
                for ab in (mod.lora_A.default, mod.lora_B.default):
                    ab.weight.data = ab.weight.data.float()  # fp32 adapters on a 16-bit base (the paper's setup)
                mod.lora_B.default.weight.normal_(0, 1e-3, generator=g)
    return model


def quantize_nf4(model, dev: str, compute_dtype: torch.dtype):
    """The PROJ linears of `model` -> bitsandbytes NF4 with double quantization, then the usual QLoRA preparation,
    as `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16))` + `prepare_model_for_kbit_training` would
    build it (no checkpoint on disk: a 7B random model is quantized in memory, one layer at a time)."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in PROJ or not isinstance(child, torch.nn.Linear):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to(dev)  # quantizes
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, q)  # the 16-bit weight goes with `child`
    model.is_loaded_in_4bit = True  # what transformers' 4-bit loader sets; PEFT then wraps in lora.bnb.Linear4bit
    # No gradient checkpointing: the same graph as the LoRA rows (fp32 embeddings and norms, as QLoRA has them).
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def build_minilm(dev: str, tiny: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    h, layers, heads, inter = (64, 2, 4, 128) if tiny else (384, 6, 12, 1536)
    cfg = BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                     vocab_size=30522, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).to(dev)
    lcfg = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], lora_dropout=0.0,
                      task_type="SEQ_CLS")
    return get_peft_model(model, lcfg)


# ------------------------------------------------------------------------------------ timing
def sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(body, dev, n, warm):
    """Step times (ms) of `n` steps after `warm` untimed ones, each step between two syncs; and the peak memory."""
    for _ in range(warm):
        body()
    sync(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(n):
        sync(dev)
        t0 = time.perf_counter()
        body()
        sync(dev)
        ts.append(1000 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
    return ts, peak


def load_reference(path: str | None, namespace: dict):
    """perturb_official / restore_official from the anchor script, bound to `namespace` (no code copied:
    the function definitions are read from the carried file at run time; its top-level code is not run)."""
    if not path or not Path(path).exists():
        return None
    tree = ast.parse(Path(path).read_text())
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("perturb_official", "restore_official")]
    if len(keep) != 2:
        return None
    exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), namespace)
    return namespace["perturb_official"], namespace["restore_official"]


@contextlib.contextmanager
def _record_checked(on: bool):
    """In-place perturbs check their record at once (triton_noise.DEFERRED = False) inside the block."""
    if not on:
        yield
        return
    from flatlora.kernels import triton_noise as K

    K.DEFERRED = False
    try:
        yield
    finally:
        K.DEFERRED = True


def step_fns(model, batch_fn, ga, dev, anchor, sigma=0.05, control=False, compile_backend=None):
    """{variant: (step closure, None or a thunk giving the engine its steps built)}; each closure runs one
    optimizer step."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    batches = [batch_fn(i) for i in range(ga)]

    def fwd_bwd(b, net=model):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = net(**b).loss
        loss.backward()

    # --compile: the same model under torch.compile (the engine stays on the model itself, as a user would build
    # it); compiled once, its graphs for the plain and the armed model cached side by side
    compiled = torch.compile(model, backend=compile_backend) if compile_backend else None

    engines = {}

    def bare():
        """The variants without an engine run on the bare model: the interleaved rounds leave the last Flat-LoRA
        variant's engine (and its hooks) on it, which would charge the baselines its host time."""
        for other in engines.values():
            other.close()
        engines.clear()

    def lora(net=model):
        bare()
        opt.zero_grad(set_to_none=True)
        for b in batches:
            fwd_bwd(b, net)
        opt.step()

    out = {"lora": (lora, None)}
    if compiled is not None:
        out["lora-compiled"] = (functools.partial(lora, compiled), None)
    if control:
        # the same LoRA step under a second name, timed interleaved like any variant: its ratio to `lora` is what
        # the machine's drift alone makes of a ratio in this run (an A/A control)
        out["lora-again"] = (lora, None)
    # flatlora-inplace-checked: in-place with the record checked right after each perturb (a host sync before
    # the forward, as before the deferred perturb), side by side with the default.
    flat_variants = [("flatlora-inplace", "inplace", model), ("flatlora-inplace-checked", "inplace", model),
                     ("flatlora-forward", "forward", model)]
    if compiled is not None:
        flat_variants += [("flatlora-inplace-compiled", "inplace", compiled), ("flatlora-forward-compiled", "forward", compiled)]
    for variant, mode, net in flat_variants:
        def flat_step(variant=variant, mode=mode, net=net):
            flat = engines.get(variant)
            if flat is None:  # one engine on the model at a time: a second live engine on its weights is refused
                bare()
                flat = engines[variant] = FlatLoRA(model, FlatLoRAConfig(sigma=sigma, schedule="constant", mode=mode, seed=0))
            opt.zero_grad(set_to_none=True)
            with _record_checked(variant.endswith("-checked")):
                with flat.step():
                    for b in batches:
                        fwd_bwd(b, net)
            opt.step()

        out[variant] = (flat_step, lambda variant=variant: engines[variant])

    ns = {"np": np, "torch": torch, "time": time, "math": math, "state": {"seed": 0, "norms": []},
          "lora_mods": [m for m in model.modules() if isinstance(m, LoraLinear)]}
    ref = load_reference(anchor, ns)
    if ref is not None:
        perturb_official, restore_official = ref

        def reference():
            bare()
            opt.zero_grad(set_to_none=True)
            perturb_official()
            for b in batches:
                fwd_bwd(b)
            restore_official()
            opt.step()

        out["reference"] = (reference, None)

    def sam(rho=0.05):
        bare()
        opt.zero_grad(set_to_none=True)
        for b in batches:
            fwd_bwd(b)
        with torch.no_grad():
            gn = torch.norm(torch.stack([p.grad.norm() for p in params]))
            es = [p.grad * (rho / (gn + 1e-12)) for p in params]
            for p, e in zip(params, es):
                p.add_(e)
        opt.zero_grad(set_to_none=True)
        for b in batches:
            fwd_bwd(b)
        with torch.no_grad():
            for p, e in zip(params, es):
                p.sub_(e)
        opt.step()

    out["sam"] = (sam, None)
    return out


def _ordinary_launches(fn) -> int:
    """Kernel launches of one step that went through Triton's generic launch rather than the pre-bound one
    (forward mode's noisy copies should all be pre-bound after the first step)."""
    from flatlora.kernels import triton_noise as K

    real, calls = K._launch, []
    K._launch = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        fn()
    finally:
        K._launch = real
    return len(calls)


def run_setting(name, model, batch_fn, ga, args, rows, variants=None, extra=None):
    """Times the variants *interleaved*: `--rounds` rounds, each running every variant for its share of the
    steps (after one untimed step: a variant's first step after another builds its engine). Drift of the
    machine over the run (clocks, a busy host) then falls on every variant alike; timed one after another,
    two runs of the same build gave the same variant 1.41x and 1.71x."""
    fns = step_fns(model, batch_fn, ga, args.dev, args.anchor, control=args.control, compile_backend=args.compile)
    unknown = sorted((args.variants or set()) - fns.keys())
    if unknown:
        raise SystemExit(f"--variants: no variant {', '.join(unknown)} in this run; choose from {', '.join(fns)} "
                         "(the -compiled ones need --compile, lora-again --control, reference --anchor)")
    order = [v for v in fns if (not variants or v in variants or v == "lora-again" or v.endswith("-compiled"))
             and (not args.variants or v in args.variants or v == "lora")]  # lora: every ratio's baseline
    n = args.steps if ga == 1 else args.steps_ga
    rounds = max(1, min(args.rounds, n))
    times: dict[str, list[float]] = {v: [] for v in order}
    round_medians: dict[str, list[float]] = {v: [] for v in order}
    peaks = dict.fromkeys(order, 0.0)
    described: dict[str, dict] = {}
    t0 = time.perf_counter()
    for r in range(rounds):
        for v in order:
            fn, flat = fns[v]
            share = n // rounds + (r < n % rounds)
            warm = (1 if ga > 1 or args.smoke else args.warmup) if r == 0 else 1
            ts, peak = timed(fn, args.dev, share, warm)
            if r == 0:  # where a call cut short spent its time (a compiled variant's first steps compile it)
                print(f"  {name}: {v} warmed up and timed round 1 at {time.perf_counter() - t0:.0f} s", flush=True)
            times[v] += ts
            round_medians[v].append(statistics.median(ts))
            peaks[v] = max(peaks[v], peak)
            if flat is not None and r == rounds - 1:
                described[v] = _describe(flat(), fn, args)  # the engine the last timed steps used, still open
    base = None
    baselines: dict[str, dict] = {}  # the profiler's op totals of lora and lora-compiled, each its variants' baseline
    for v in order:
        fn = fns[v][0]
        r = {"median_ms": statistics.median(times[v]), "min_ms": min(times[v]), "peak_mem_gib": peaks[v],
             "n_steps": len(times[v]), "rounds": rounds}
        row = {"setting": name, "variant": v, **r, **(extra or {}), **described.get(v, {})}
        if v == "lora":
            base = r["median_ms"]
        row["ratio_vs_lora"] = r["median_ms"] / base if base else None
        if v != "lora" and "lora" in round_medians:
            row.update(round_ratio_ci(round_medians[v], round_medians["lora"]))
        compiled = v.endswith("-compiled") and v != "lora-compiled" and "lora-compiled" in round_medians
        if compiled:  # what compiling users pay: the same engine against the compiled LoRA step
            row["ratio_vs_lora_compiled"] = r["median_ms"] / statistics.median(times["lora-compiled"])
            row.update({f"{k}_vs_lora_compiled": x for k, x in
                        round_ratio_ci(round_medians[v], round_medians["lora-compiled"]).items()})
        rows.append(row)
        if args.profile and (v in ("lora", "lora-compiled") or v.startswith("flatlora")):
            base_of = "lora-compiled" if v.endswith("-compiled") else "lora"
            ops = profile(fn, args, f"{name}-{v}", baseline=baselines.get(base_of) if v != base_of else None)
            if v == base_of:
                baselines[v] = ops
        ci = row.get("round_ratio_ci95")
        cci = row.get("round_ratio_ci95_vs_lora_compiled")
        print(f"  {name:<22} {v:<18} {r['median_ms']:10.2f} ms  x{row['ratio_vs_lora'] or 0:6.3f}  "
              + (f"[{ci[0]:.3f}, {ci[1]:.3f}]  " if ci else "") +
              f"peak {r['peak_mem_gib']:7.2f} GiB" + (f"  record {row['restore_record_bytes'] / 2**20:.1f} MiB"
                                                     if "restore_record_bytes" in row else "")
              + (f"  x{row['ratio_vs_lora_compiled']:6.3f} of lora-compiled" + (f" [{cci[0]:.3f}, {cci[1]:.3f}]" if cci else "")
                 if compiled else ""), flush=True)
        gc.collect()


def round_ratio_ci(variant: list[float], lora: list[float], resamples: int = 2000) -> dict:
    """The variant's ratio to LoRA round by round (each round times both back to back, so a round's ratio is paired
    against the drift of its stretch): their median, and a 95 % percentile-bootstrap interval of that median over
    the rounds (fixed seed; None with fewer than 5 rounds, where it would mean nothing)."""
    ratios = np.asarray(variant) / np.asarray(lora)
    out = {"round_ratio_median": float(np.median(ratios)), "round_ratio_ci95": None}
    if len(ratios) >= 5:
        rng = np.random.default_rng(0)
        meds = np.median(ratios[rng.integers(0, len(ratios), (resamples, len(ratios)))], axis=1)
        out["round_ratio_ci95"] = [float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))]
    return out


def _describe(flat, fn, args) -> dict:
    """The row fields a Flat-LoRA variant adds (read while its engine is the live one)."""
    out = {"generator": flat.config.generator}
    if flat.mode == "inplace":
        out["restore_record_bytes"] = flat.metrics().get("flatlora/restore_record_bytes", 0.0)
        out["base_weight_bytes"] = sum(t.weight.numel() * t.weight.element_size() for t in flat.targets)
    if flat.mode == "forward" and args.dev == "cuda":
        out["ordinary_launches_per_step"] = _ordinary_launches(fn)
    return out


def _op_totals(ka) -> dict[str, tuple[int, float, float]]:
    """op name -> (calls, self host us, self device us) of a profiler's key averages."""
    return {e.key: (e.count, e.self_cpu_time_total, getattr(e, "self_device_time_total", 0.0)) for e in ka}


def _diff_table(ops: dict, base: dict, steps: int, limit: int = 30) -> str:
    """The ops whose self host time per step differs most from the baseline's (LoRA's), with call counts."""
    rows = []
    for name in set(ops) | set(base):
        c, h, d = ops.get(name, (0, 0.0, 0.0))
        c0, h0, d0 = base.get(name, (0, 0.0, 0.0))
        rows.append((h - h0, name, c - c0, d - d0))
    rows.sort(key=lambda r: -abs(r[0]))
    lines = [f"{'op':<70} {'d calls/step':>12} {'d host ms/step':>15} {'d device ms/step':>17}"]
    for dh, name, dc, dd in rows[:limit]:
        lines.append(f"{name[:70]:<70} {dc / steps:>12.1f} {dh / steps / 1e3:>15.3f} {dd / steps / 1e3:>17.3f}")
    return "\n".join(lines)


def profile(fn, args, label, steps=2, baseline=None):
    """torch.profiler over `steps` steps of a variant: the top ops by device time (and host time) into
    `--out`, to see where the added time goes (launch counts, syncs, kernels); with `baseline` (LoRA's op
    totals, which this returns for the variant profiled) also the ops whose host time differs most from it."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.dev == "cuda" else [])
    fn()  # untimed: the variant's engine may have to be built again (the rounds end on another variant)
    sync(args.dev)
    with prof(activities=acts) as p:
        for _ in range(steps):
            fn()
        sync(args.dev)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    if getattr(args, "trace", False):  # the timeline: where the device idles and what the host does then
        trace = Path(args.out) / f"trace-{safe}.json"
        trace.parent.mkdir(parents=True, exist_ok=True)
        p.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
    key = "cuda_time_total" if args.dev == "cuda" else "cpu_time_total"
    ka = p.key_averages()
    cp = cProfile.Profile()
    cp.enable()
    for _ in range(steps):
        fn()
    sync(args.dev)
    cp.disable()
    py = io.StringIO()
    pstats.Stats(cp, stream=py).sort_stats("cumulative").print_stats("flatlora", 40)
    totals = _op_totals(ka)
    text = (f"# {label}: {steps} steps\n## by device time\n{ka.table(sort_by=key, row_limit=30)}\n"
            f"## by host time\n{ka.table(sort_by='cpu_time_total', row_limit=30)}\n"
            + (f"## against LoRA (per step; + = more than LoRA)\n{_diff_table(totals, baseline, steps)}\n"
               if baseline is not None else "")
            + f"## Python functions of flatlora (cProfile, {steps} more steps)\n{py.getvalue()}\n")
    path = Path(args.out) / f"profile-{safe}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"  wrote {path}", flush=True)
    return totals


def llama_batch(vocab, bs, seq, dev):
    def make(i):
        g = torch.Generator(device=dev).manual_seed(100 + i)
        x = torch.randint(0, vocab, (bs, seq), device=dev, generator=g)
        return {"input_ids": x, "labels": x}

    return make


def bench_llama(args, rows, setting, size, bs, seq, ga, variants=None, nf4=False):
    vocab = 256 if args.smoke else 32000
    model = build_llama(size, args.dev, vocab, nf4=nf4)
    if nf4:
        import bitsandbytes as bnb

        n_params = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    else:
        n_params = sum(p.numel() for n, p in model.named_parameters() if any(k in n for k in PROJ) and "lora" not in n)
    extra = {"model": size, "micro_batch": [bs, seq], "accumulation": ga, "tokens_per_step": bs * seq * ga,
             "base_linear_params": n_params}
    if nf4:
        extra["base"] = "bitsandbytes nf4, double quant, compute " + ("bf16" if args.dev == "cuda" else "fp32")
        try:
            FlatLoRA(model, sigma=0.05, mode="inplace").close()  # should it ever build, it must not hold the weights
            refusal = None
        except ValueError as e:
            refusal = str(e)
        rows.append({"setting": setting, "variant": "flatlora-inplace", "refused": refusal, **extra})
        print(f"  {setting:<22} flatlora-inplace   refused: {refusal}", flush=True)
    run_setting(setting, model, llama_batch(vocab, bs, seq, args.dev), ga, args, rows, variants, extra)
    del model
    gc.collect()
    if args.dev == "cuda":
        torch.cuda.empty_cache()


def bench_minilm(args, rows):
    model = build_minilm(args.dev, args.smoke)

    def make(i):
        g = torch.Generator(device=args.dev).manual_seed(i)
        x = torch.randint(0, 30522, (32, 64), device=args.dev, generator=g)
        return {"input_ids": x, "labels": torch.randint(0, 2, (32,), device=args.dev, generator=g)}

    steps = args.steps
    args.steps = max(args.steps, 3 if args.smoke else 50)
    run_setting("minilm-l6 32x64", model, make, 1, args, rows, None, {"model": "minilm-l6-shape", "micro_batch": [32, 64]})
    args.steps = steps


def bench_exact(args, rows):
    """bf16/fp16 frozen weights bit-identical after N steps, both modes (engine on one 4096^2 LoRA layer)."""
    from peft import LoraConfig, get_peft_model

    n, steps = (64, 20) if args.smoke else (4096, 1000)
    for dtype in (torch.bfloat16, torch.float16):
        for mode in ("inplace", "forward"):
            torch.manual_seed(0)
            lin = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)).to(args.dev)
            with torch.no_grad():
                lin[0].weight.normal_(0, 0.02)
            lin = lin.to(dtype)
            pm = get_peft_model(lin, LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False))
            w = pm.base_model.model[0].base_layer.weight
            w0 = w.detach().clone()
            flat = FlatLoRA(pm, FlatLoRAConfig(sigma=0.1, total_steps=steps, mode=mode, seed=1))
            opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
            x = torch.randn(8, n, device=args.dev, dtype=dtype)
            records, t0 = [], time.perf_counter()
            for t in range(steps):
                with flat.step(t):
                    pm(x).float().pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                records.append(flat.metrics().get("flatlora/restore_record_bytes", 0.0))
            sync(args.dev)
            ints = torch.int16
            same = bool(torch.equal(w.detach().view(ints), w0.view(ints)))
            row = {"setting": "exactness", "variant": f"flatlora-{mode}", "dtype": str(dtype).split(".")[-1],
                   "steps": steps, "bit_identical": same, "secs": time.perf_counter() - t0,
                   "max_record_bytes": max(records), "weight_bytes": w.numel() * w.element_size(),
                   "generator": flat.config.generator}
            rows.append(row)
            print(f"  exactness {row['dtype']:<9} {mode:<8} {steps} steps: bit-identical={same}  "
                  f"max record {max(records) / 2**20:.2f} MiB of {row['weight_bytes'] / 2**20:.0f} MiB", flush=True)


def bench_qlora(args, rows):
    """Plain QLoRA vs Flat-QLoRA (forward mode) on the Llama-2-7B shape in NF4; skipped, with a row saying
    why, where bitsandbytes cannot be imported."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # not installed, or its native library does not load
        why = (f"bitsandbytes is not importable ({type(e).__name__}: {e}); install its wheel first "
               f"(benchmarks/overhead/README.md, 'QLoRA on the GPU')")
        rows.append({"setting": "qlora", "skipped": why})
        print(f"  qlora: skipped: {why}", flush=True)
        return
    big = "tiny" if args.smoke else "llama-7b"
    keep = ["lora", "flatlora-forward"]
    bench_llama(args, rows, "qlora micro 4x512", big, 4, 16 if args.smoke else 512, 1, keep, nf4=True)
    bench_llama(args, rows, "qlora micro 2x1024", big, 2, 32 if args.smoke else 1024, 2 if args.smoke else 16, keep,
                nf4=True)


def provenance(args):
    from flatlora.experiments.runner import versions

    info = {**versions(), "device": torch.cuda.get_device_name(0) if args.dev == "cuda" else platform.processor() or "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "command": " ".join([Path(sys.executable).name] + sys.argv), "smoke": args.smoke,
            "anchor": args.anchor if args.anchor and Path(args.anchor).exists() else None}
    for mod in ("triton", "peft", "transformers", "bitsandbytes"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # a missing optional package is recorded, not fatal
            info[mod] = f"missing ({type(e).__name__})"
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--anchor", default=".carry/anchor_overhead.py", help="the carried reference script")
    ap.add_argument("--only", default="acc1,acc16,minilm,sweep,exact",
                    help="comma-separated settings: acc1, acc16, minilm, sweep, exact, qlora (needs bitsandbytes)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (accumulation 1)")
    ap.add_argument("--steps-ga", type=int, default=4, help="timed steps (accumulation 16; each is 16 micro-batches)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5, help="interleave the variants over this many rounds of their steps")
    ap.add_argument("--control", action="store_true",
                    help="add `lora-again`, the LoRA step timed a second time interleaved: the ratio drift alone gives")
    ap.add_argument("--compile", metavar="BACKEND", default=None,
                    help="also time lora / flatlora-inplace / flatlora-forward on torch.compile(model, backend=BACKEND) "
                         "(e.g. inductor): the `-compiled` variants, ratios still against eager `lora`")
    ap.add_argument("--variants", default=None, type=lambda v: set(v.split(",")),
                    help="comma list: time only these variants (lora always; default: all)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device (checks the script, not speed)")
    ap.add_argument("--profile", action="store_true", help="also write a torch.profiler table of 2 steps per Flat-LoRA variant")
    ap.add_argument("--trace", action="store_true", help="with --profile: also its timeline (trace-*.json.gz, chrome://tracing)")
    args = ap.parse_args(argv)
    args.dev = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.steps, args.steps_ga, args.warmup = 2, 1, 1
    only = set(args.only.split(","))
    big = "tiny" if args.smoke else "llama-7b"
    rows: list[dict] = []
    info = provenance(args)
    print(json.dumps(info), flush=True)
    t_all = time.perf_counter()
    if "acc1" in only:
        bench_llama(args, rows, "acc1 micro 4x512", big, 4, 16 if args.smoke else 512, 1)
    if "acc16" in only:
        bench_llama(args, rows, "acc16 micro 2x1024", big, 2, 32 if args.smoke else 1024, 2 if args.smoke else 16)
    if "minilm" in only:
        bench_minilm(args, rows)
    if "sweep" in only:
        sizes = ["tiny", "tiny2"] if args.smoke else ["llama-1b", "llama-3b", "llama-7b"]
        keep = ["lora", "flatlora-inplace", "flatlora-forward"]
        for size in sizes:
            bench_llama(args, rows, f"sweep {size} 4x512", size, 4, 16 if args.smoke else 512, 1, keep)
        for bs in (1, 8):  # tokens: the in-place overhead should not move; forward mode's share does
            bench_llama(args, rows, f"sweep {sizes[0]} {bs}x512", sizes[0], bs, 16 if args.smoke else 512, 1, keep)
    if "exact" in only:
        bench_exact(args, rows)
    if "qlora" in only:
        bench_qlora(args, rows)
    info["total_secs"] = time.perf_counter() - t_all
    slug = "smoke-" + args.dev if args.smoke else torch.cuda.get_device_name(0).lower().replace(" ", "-") if args.dev == "cuda" else "cpu"
    if args.only != ap.get_default("only"):
        slug += "-" + args.only.replace(",", "_")  # a partial run (no "+": the device returns no such name)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"overhead-{slug}.json"
    path.write_text(json.dumps({"provenance": info, "rows": rows}, indent=1))
    print(f"wrote {path} ({info['total_secs']:.0f} s)")
    return rows


if __name__ == "__main__":
    main()
