"""Flat-LoRA under DDP with torchrun: the plain-loop pattern, unchanged.

    torchrun --nproc_per_node=2 examples/torchrun_ddp.py        # gloo on CPU, NCCL on GPUs
    python examples/torchrun_ddp.py                             # also runs as a single process

Noise is the same on every rank by default (the key ignores the rank), so this run equals a 1-process run
with the same global batch; FlatLoRAConfig(per_rank_noise=True) gives each rank its own draw. The schedule
counts optimizer steps, so sigma_t reaches sigma at the last step for any world size.
"""

import argparse
import contextlib
import os

import peft
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from flatlora import FlatLoRA, FlatLoRAConfig


def main(steps: int = 10, grad_accum: int = 2, global_batch: int = 16, sigma: float = 0.05) -> dict:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=int(os.environ.get("RANK", 0)),
                            world_size=int(os.environ.get("WORLD_SIZE", 1)))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.manual_seed(0)  # same initial weights on every rank
    base = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    flat = FlatLoRA(model, FlatLoRAConfig(sigma=sigma, total_steps=steps, seed=0))  # on the unwrapped model
    ddp = DDP(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)  # every rank builds the global batch and takes its slice
    x = torch.randn(steps, grad_accum, global_batch, 16, generator=g)
    y = x.sum(-1, keepdim=True).sin()
    b = global_batch // world
    for t in range(steps):
        with flat.step(t):
            for i in range(grad_accum):
                last = i == grad_accum - 1  # all-reduce once per window
                with contextlib.nullcontext() if last else ddp.no_sync():
                    xi, yi = x[t, i, rank * b:(rank + 1) * b].to(device), y[t, i, rank * b:(rank + 1) * b].to(device)
                    loss = nn.functional.mse_loss(ddp(xi), yi) / grad_accum
                    loss.backward()
        opt.step()
        opt.zero_grad()
    result = {"rank": rank, "world": world, "sigma_last": flat.metrics()["flatlora/sigma"], "loss": loss.item() * grad_accum}
    if rank == 0:
        print(result)
    dist.destroy_process_group()
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sigma", type=float, default=0.05)
    a = ap.parse_args()
    main(a.steps, sigma=a.sigma)
