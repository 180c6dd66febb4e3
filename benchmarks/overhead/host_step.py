"""The engine's host time a step on the Triton path (in-place and forward mode), on CPU with the kernel launches stubbed.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/overhead/host_step.py [--steps 30] [--profile] [--out DIR]

On the H200 the 7B in-place step is device-bound by a little (issue 10: 244 ms of device a step, 248 of host of
which 14.6 ms blocked on a full command queue) and MiniLM's is host-bound, so the Python the engine runs per step
and layer decides the small models and is next in line for the large ones. This runs `begin_step` + `end_step`
(in-place, the Triton backend: row std, perturb and restore tables, records, outcomes) on CPU tensors with
`_noise_kernel` and `_rowstd_kernel` replaced by no-ops (what is timed is everything but the kernels and
Triton's own launch; a one-layer copy copies W), forward mode's autograd function alone against a plain linear
layer (`forward-scaffold`: no copy, no kernel), and forward mode's forward + backward against LoRA's on the same
model, for the 7B layer count (32 blocks x q, k, v, o, gate, up, down = 224 LoRA layers, tiny dimensions:
the host work does not depend on them) and MiniLM-L6's (37, the pooler included). Absolute times are this CPU's;
the point is the per-layer cost and which code it goes to (`--profile`: cProfile of flatlora's functions in
place). Forward mode's figure includes the noisy layers' small bf16 matmuls on the CPU, and its copies take
Triton's ordinary launch path (stubbed) where a GPU takes the pre-bound one. Writes host-step-cpu.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))
sys.path.insert(0, str(HERE))

from kernel_bench import provenance, write_results  # noqa: E402


class _NoLaunch:
    """Stands for a @triton.jit kernel: `kernel[grid](...)` computes nothing, but a perturb leaves its record's
    headers as a clean perturb with no entries would (slot 0, count 0), so every step takes the deferred path
    (uninitialised headers read as tiles left without noise, and each next perturb would be checked at once)."""

    pre_run_hooks: list = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if kwargs.get("MODE") == 0:  # PERTURB: (tab, map, counter, header, ...)
                args[3].zero_()
            elif kwargs.get("MODE") == 2 and kwargs.get("LAYER_ARGS"):  # a one-layer COPY: out <- W, no noise
                args[8].copy_(args[7])  # (uninitialised outputs could hold denormals and slow the matmuls down)

        return launch


def _models():
    """(name, PEFT model): 224 and 37 LoRA layers with bf16 bases and float32 adapters, dims too small to matter."""
    import peft
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    llama = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                                   num_attention_heads=4, num_key_value_heads=4))
    bert = BertModel(BertConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                num_attention_heads=4))
    out = []
    for name, model, targets in (
            ("7b-layers-224", llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
            ("minilm-layers-37", bert, ["query", "key", "value", "dense"])):
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)
        model = peft.get_peft_model(model.to(torch.bfloat16), cfg)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
        out.append((name, model))
    return out


def measure(model, steps: int, profile: bool):
    from flatlora import FlatLoRA, FlatLoRAConfig

    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10_000, mode="inplace", schedule="constant",
                                          generator="philox"))
    backends = {b.name for b, _ in flat._mode.plan}
    if backends != {"triton"}:
        raise SystemExit(f"expected every layer on the Triton backend, got {backends}")
    layers = sum(len(ts) for _, ts in flat._mode.plan)
    times = {"begin_step": [], "end_step": []}
    for t in range(steps + 2):
        t0 = time.perf_counter()
        flat.begin_step(t)
        t1 = time.perf_counter()
        flat.end_step()
        t2 = time.perf_counter()
        if t >= 2:  # the first perturb sizes its record (one check), the second is the first deferred one
            times["begin_step"].append(t1 - t0)
            times["end_step"].append(t2 - t1)
    prof = None
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        for t in range(steps + 2, 2 * steps + 2):
            flat.begin_step(t)
            flat.end_step()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats("flatlora", 25)
        prof = s.getvalue()
    flat.close()
    # the minimum: Python's time on a shared CPU is the fastest pass plus whatever else ran (the median moved
    # by 1.5x between runs of one build here, the minimum by a few %)
    best = {k: 1000 * min(v) for k, v in times.items()}
    return layers, best, prof


def _seconds(fn, n: int, warm: int) -> list[float]:
    """Wall seconds of `n` calls of `fn` after `warm` untimed ones."""
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def measure_forward(model, steps: int):
    """Forward mode: the fastest forward + backward of a 1 x 8 token batch with LoRA alone and with the forward-mode
    window around it (begin_step, forward, backward, end_step), on the same model: their difference is forward
    mode's host cost (the patched forward, two noisy copies a layer, the std draw) plus a little compute."""
    from flatlora import FlatLoRA, FlatLoRAConfig

    ids = torch.randint(0, 64, (1, 8))

    def fwd_bwd():
        model(input_ids=ids).last_hidden_state.float().sum().backward()

    def fastest(fn):
        return 1000 * min(_seconds(fn, steps, warm=1))

    lora = fastest(fwd_bwd)
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=0.05, total_steps=10_000, mode="forward", schedule="constant",
                                          generator="philox"))
    step = iter(range(10**9))

    def flat_step():
        flat.begin_step(next(step))
        fwd_bwd()
        flat.end_step()

    flat_step()
    with_flat = fastest(flat_step)
    lora = min(lora, fastest(fwd_bwd))  # LoRA again after: the same model, warmed the same
    flat.close()
    model.zero_grad(set_to_none=True)
    return lora, with_flat


def measure_scaffold(calls: int = 3000) -> tuple[float, float]:
    """Forward mode's autograd function alone: forward + backward of an 8 x 8 linear layer as a plain F.linear and as
    `forward._NoisyLayer` with a noisy weight that is W itself (no copy, no kernel), in us a call (the 10th
    percentile of `calls`). The difference is what the function's Python costs every layer call, whatever the copy."""
    import torch.nn.functional as F

    from flatlora.core import forward as fwd
    from flatlora.core.targets import Target

    lin = torch.nn.Linear(8, 8, bias=False).requires_grad_(False)
    t = Target("scaffold", lin, None, "linear", False, 8, 8)
    w, x = lin.weight, torch.randn(4, 8, requires_grad=True)

    def plain():
        F.linear(x, w).sum().backward()

    def noisy_layer():
        fwd._NoisyLayer.apply(x, w, None, t, lambda: w).sum().backward()

    def p10(fn):
        return 1e6 * sorted(_seconds(fn, calls, warm=100))[calls // 10]

    return p10(plain), p10(noisy_layer)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", str(HERE.parents[0] / "results")))
    args = ap.parse_args(argv)
    import flatlora.kernels as kernels
    from flatlora.kernels import triton_noise as K

    torch.set_num_threads(1)
    kernels.FORCE_TRITON = True  # CPU tensors take the Triton backend's host path ...
    K._noise_kernel = K._rowstd_kernel = _NoLaunch()  # ... and launch nothing
    rows = []
    for name, model in _models():
        layers, best, prof = measure(model, args.steps, args.profile)
        total = best["begin_step"] + best["end_step"]
        rows.append({"setting": name, "mode": "inplace", "layers": layers, "begin_step_ms": best["begin_step"],
                     "end_step_ms": best["end_step"], "total_ms": total, "us_per_layer": 1000 * total / layers})
        print(f"{name:<18} {layers:4d} layers  in-place: begin_step {best['begin_step']:7.2f} ms  "
              f"end_step {best['end_step']:6.2f} ms  {1000 * total / layers:6.1f} us a layer", flush=True)
        if prof:
            print(prof)
        lora, with_flat = measure_forward(model, args.steps)
        added = with_flat - lora
        rows.append({"setting": name, "mode": "forward", "layers": layers, "lora_fwd_bwd_ms": lora,
                     "flat_fwd_bwd_ms": with_flat, "total_ms": added, "us_per_layer": 1000 * added / layers})
        print(f"{name:<18} {layers:4d} layers  forward: LoRA fwd+bwd {lora:7.2f} ms, with the window {with_flat:7.2f} ms"
              f"  {1000 * added / layers:6.1f} us a layer", flush=True)
    plain, scaffold = measure_scaffold()
    rows.append({"setting": "linear-8x8", "mode": "forward-scaffold", "plain_linear_us": plain,
                 "noisy_layer_us": scaffold, "added_us_per_call": scaffold - plain})
    print(f"forward mode's autograd function: a linear layer's forward + backward {plain:.1f} us plain, "
          f"{scaffold:.1f} us through it (+{scaffold - plain:.1f} us a layer call, no copy)", flush=True)
    info = provenance(threads=torch.get_num_threads(), kernels="stubbed (host path only)")
    info["device"] = "cpu"
    write_results(args.out, "host-step", info, rows)


if __name__ == "__main__":
    main()
