"""DDP and FSDP2 Flat-LoRA runs against a single-process run with the same global batch.

    torchrun --nproc_per_node=2 benchmarks/distributed/ddp_fsdp2.py                  # GPU (NCCL), LLaMA-shaped model
    python benchmarks/distributed/ddp_fsdp2.py --device cpu --tiny --spawn 2         # CPU smoke test (gloo, mp.spawn)

Every strategy trains the same LoRA model (LLaMA-shaped, random init, fp32) for `--steps` optimizer steps of
`--grad-accum` micro-batches; each rank takes its slice of each global micro-batch. Checks:
  * DDP and FSDP2 final adapters match the 1-process run within tolerance (all-reduce averaging changes bits);
  * sigma_t of the last step is exactly sigma for any world size (the schedule counts optimizer steps);
  * default noise is identical on every rank; per_rank_noise=True gives each rank its own draw;
  * frozen base weights are bit-identical to their start after training;
  * FSDP1 (flat parameters) with mode="inplace" is refused with a message naming what to use instead.
The result is printed as one JSON line (and written to --out). The 1-process reference runs first, in rank 0.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from flatlora import FlatLoRA, FlatLoRAConfig


def build(tiny: bool, device: torch.device, seed: int = 0):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # same init on every rank and in the reference
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=128) if tiny else dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                                  num_attention_heads=16, num_key_value_heads=4, vocab_size=8192)
    model = LlamaForCausalLM(LlamaConfig(**size, attn_implementation="eager")).to(device)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def data(args, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (args.steps, args.grad_accum, args.global_batch, args.seq), generator=g)


def train(args, strategy: str, rank: int, world: int, device: torch.device, per_rank_noise: bool = False) -> dict:
    model = build(args.tiny, device)
    clean = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    wrapped = model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    elif strategy.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    # Built on the unwrapped model after sharding: FSDP2 weights are then DTensor row shards, perturbed in place.
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=args.sigma, total_steps=args.steps, seed=0,
                                          per_rank_noise=per_rank_noise,
                                          mode="forward" if strategy.endswith("forward") else "inplace"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    ids = data(args, model.config.vocab_size)
    b = args.global_batch // world
    probe_name = next(t.name for t in flat.targets)
    noise_rows = None
    t0 = time.perf_counter()
    for t in range(args.steps):
        with flat.step(t):
            if t == args.steps - 1 and strategy in ("ddp", "single"):  # one layer's noise, to compare across ranks
                noise_rows = flat.noise(probe_name, t)[:4].cpu()
            for mb in ids[t]:
                x = mb[rank * b:(rank + 1) * b].to(device)
                loss = wrapped(input_ids=x, labels=x).loss / args.grad_accum
                loss.backward()
        opt.step()
        opt.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    full = lambda p: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()  # noqa: E731
    adapters = {n: full(p) for n, p in model.named_parameters() if p.requires_grad}
    base_clean = all(torch.equal(full(p), full(clean[n])) for n, p in model.named_parameters() if not p.requires_grad)
    return {"adapters": adapters, "sigma_last": flat.metrics()["flatlora/sigma"], "base_clean": base_clean,
            "noise_rows": noise_rows, "mode": flat.mode, "seconds": seconds}


def fsdp1_refused(args, device) -> str:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = FSDP(build(args.tiny, device), use_orig_params=True, device_id=device if device.type == "cuda" else None)
    try:
        FlatLoRA(model, FlatLoRAConfig(sigma=args.sigma, total_steps=args.steps, mode="inplace"))
    except ValueError as e:
        return str(e)
    return ""


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def worker(rank: int, world: int, args) -> dict | None:
    backend = "nccl" if args.device == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    ref = train(args, "single", 0, 1, device) if rank == 0 else None
    res = {}
    for strategy in args.strategies:
        try:
            out = train(args, strategy, rank, world, device)
        except Exception as e:  # a strategy the platform lacks (e.g. FSDP2 on an old CPU build) is reported, not fatal
            if os.environ.get("FLATLORA_DEBUG"):
                import traceback
                traceback.print_exc()
            res[strategy] = {"error": f"{type(e).__name__}: {e}"}
            continue
        rows = [None] * world
        dist.all_gather_object(rows, out["noise_rows"])
        same = None if rows[0] is None else all(torch.equal(rows[0], r) for r in rows)
        res[strategy] = {"noise_same_on_ranks": same, "out": out}
    per_rank = train(args, "ddp", rank, world, device, per_rank_noise=True)
    rows = [None] * world
    dist.all_gather_object(rows, per_rank["noise_rows"])
    try:
        refused = fsdp1_refused(args, device)
    except Exception as e:
        refused = f"not run: {type(e).__name__}: {e}"
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return None
    report = {"world_size": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tiny": args.tiny, "steps": args.steps, "grad_accum": args.grad_accum,
              "global_batch": args.global_batch, "sigma": args.sigma, "single_seconds": round(ref["seconds"], 3),
              "per_rank_noise_differs": not all(torch.equal(rows[0], r) for r in rows[1:]),
              "fsdp1_inplace_error": refused}
    for strategy, r in res.items():
        if "error" in r:
            report[strategy] = r
            continue
        out = r["out"]
        diff = max_diff(out["adapters"], ref["adapters"])
        report[strategy] = {"max_abs_diff_vs_single": diff, "match": diff <= args.atol,
                            "sigma_last": out["sigma_last"], "sigma_last_is_sigma": out["sigma_last"] == args.sigma,
                            "noise_same_on_ranks": r["noise_same_on_ranks"], "base_bit_identical": out["base_clean"],
                            "mode": out["mode"], "seconds": round(out["seconds"], 3)}
    return report


def _spawned(rank, world, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    report = worker(rank, world, args)
    if report is not None:
        _emit(report, args.out)


def _emit(report: dict, out: str | None) -> None:
    line = json.dumps(report)
    print(line, flush=True)
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="2-layer hidden-32 model (CPU smoke test)")
    ap.add_argument("--spawn", type=int, default=0, help="launch this many processes with torch.multiprocessing")
    ap.add_argument("--strategies", nargs="+", default=["ddp", "fsdp2", "fsdp2_forward"],
                    help="ddp; fsdp2 (in-place on local row shards); fsdp2_forward (mode='forward' under FSDP2)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--atol", type=float, default=None, help="max |adapter diff| for a match (default 1e-5 CPU, 1e-3 GPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.atol is None:
        args.atol = 1e-5 if args.device == "cpu" else 1e-3
    if args.spawn:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(args.spawn, args, port), nprocs=args.spawn, join=True)
        return
    if "RANK" not in os.environ:
        sys.exit("run under torchrun (--nproc_per_node=2) or pass --spawn N")
    report = worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
    if report is not None:
        _emit(report, args.out)


if __name__ == "__main__":
    main()
